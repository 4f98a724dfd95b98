package nodeagent

// Running containers as local processes: building the container-init spec
// from the pod (command, env, mounts, user), starting and watching the
// process, stopping it, and turning its end into a terminated state.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
)

const (
	defaultTerminationMessagePath = "/dev/termination-log"
	// The kubelet's limits for termination messages.
	maxTerminationMessageBytes    = 4096
	maxFallbackLogBytes           = 2048
	maxFallbackLogLines           = 80
	nonRootDefaultUID             = 65532 // distroless "nonroot"
	containerIDScheme             = "local-process://"
	defaultTerminationGracePeriod = 30
)

// containerRun is one run of a container: one process tree.
type containerRun struct {
	id        string
	pid       int
	startedAt time.Time
	done      chan struct{} // closed once the process is reaped
	exit      exitInfo      // valid after done

	spec         initSpec // kept for exec probes
	cgroup       *memoryCgroup
	files        []string // per-run files removed after the run
	termFile     string
	startErrFile string
	logPath      string
	logOffset    int64 // where this run's output starts in the log

	probes     *probeSet
	stopProbes context.CancelFunc
}

// exitInfo is how a process ended.
type exitInfo struct {
	code   int32
	signal syscall.Signal // 0 when it exited by itself
	at     time.Time
}

func (r *containerRun) exited() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// signalGroup signals the container's process group (the shim makes the
// container process a group leader), unless the process is already reaped
// (its pid could belong to someone else by then).
func (r *containerRun) signalGroup(sig syscall.Signal) {
	if !r.exited() {
		_ = syscall.Kill(-r.pid, sig)
	}
}

// stopRuns stops processes as the kubelet stops containers: SIGTERM, then
// SIGKILL for whatever still runs when grace has passed.
func stopRuns(runs []*containerRun, grace time.Duration) {
	if len(runs) == 0 {
		return
	}
	for _, r := range runs {
		r.signalGroup(syscall.SIGTERM)
	}
	timer := time.NewTimer(grace)
	defer timer.Stop()
	for _, r := range runs {
		select {
		case <-r.done:
		case <-timer.C:
			for _, r2 := range runs {
				r2.signalGroup(syscall.SIGKILL)
			}
			for _, r2 := range runs {
				<-r2.done
			}
			return
		}
	}
}

// startContainer builds everything a run needs and starts it. Errors that
// are the pod's fault are *configError (CreateContainerConfigError).
func (w *podWorker) startContainer(ctx context.Context, pod *corev1.Pod, rec *containerRecord, c *corev1.Container, img imageEntry) (*containerRun, error) {
	a := w.agent
	env, err := resolveEnv(ctx, envContext{
		pod: pod, container: c,
		allocatable: a.allocatable,
		serviceEnv:  a.serviceEnv(),
		defaultPath: os.Getenv("PATH"),
		objects:     a.objects,
	})
	if err != nil {
		return nil, err
	}
	sec, err := securityFor(pod, c)
	if err != nil {
		return nil, err
	}
	mounts, err := containerMounts(c, w.volumes, env.vars)
	if err != nil {
		return nil, err
	}
	if !a.isolate && (len(mounts) > 0 || sec.readOnlyRoot || sec.uid != nil) {
		return nil, errors.New("the local node agent is not running as root: volumeMounts, readOnlyRootFilesystem and runAsUser/runAsNonRoot need root")
	}

	attempt := rec.restartCount
	if rec.terminated != nil {
		attempt++ // this run is a restart
	}
	podDir := a.podDir(pod.UID)
	runDir := filepath.Join(podDir, "run")
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return nil, err
	}
	base := filepath.Join(runDir, fmt.Sprintf("%s-%d", c.Name, attempt))
	run := &containerRun{
		id:           fmt.Sprintf("%s%s/%s/%d", containerIDScheme, pod.UID, c.Name, attempt),
		done:         make(chan struct{}),
		termFile:     base + ".termination-log",
		startErrFile: base + ".start-error",
		logPath:      a.logPath(pod, c.Name),
	}
	run.files = []string{base + ".json", run.startErrFile, run.termFile, base + ".pid"}
	for _, f := range run.files {
		_ = os.Remove(f)
	}

	// The termination-message file: fresh per run, writable by any uid
	// the container may run as, bound on terminationMessagePath.
	if err := os.WriteFile(run.termFile, nil, 0o666); err != nil {
		return nil, err
	}
	if err := os.Chmod(run.termFile, 0o666); err != nil {
		return nil, err
	}
	if a.isolate {
		path := c.TerminationMessagePath
		if path == "" {
			path = defaultTerminationMessagePath
		}
		mounts = append(mounts, initMount{Source: run.termFile, Target: path})
		sortMounts(mounts)
	}

	if limit, ok := c.Resources.Limits[corev1.ResourceMemory]; ok && !limit.IsZero() {
		cg, err := a.cgroups.create(fmt.Sprintf("%s-%s", pod.UID, c.Name), limit.Value())
		if err != nil {
			return nil, err
		}
		run.cgroup = cg
	}

	workingDir := c.WorkingDir
	if workingDir == "" {
		workingDir = podDir
	}
	run.spec = initSpec{
		Argv:         containerArgv(c, img, env.vars),
		Env:          env.list,
		WorkingDir:   workingDir,
		Isolate:      a.isolate,
		Mounts:       mounts,
		ReadOnlyRoot: sec.readOnlyRoot,
		UID:          sec.uid,
		GID:          sec.gid,
		Groups:       sec.groups,
		NoNewPrivs:   sec.noNewPrivs,
		StartErrorFD: 3, // cmd.ExtraFiles[0]
	}
	spec := run.spec
	if run.cgroup != nil {
		spec.CgroupProcs = run.cgroup.procsFile()
	}
	if err := writeJSON(base+".json", spec); err != nil {
		run.cgroup.destroy()
		return nil, err
	}

	logFile, offset, err := openLog(run.logPath)
	if err != nil {
		run.cgroup.destroy()
		return nil, err
	}
	run.logOffset = offset
	_ = os.Symlink(run.logPath, filepath.Join(podDir, c.Name+".log"))

	errFile, err := os.OpenFile(run.startErrFile, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		logFile.Close()
		run.cgroup.destroy()
		return nil, err
	}
	cmd := a.shimCommand(base + ".json")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.ExtraFiles = []*os.File{errFile}
	err = cmd.Start()
	logFile.Close() // the child has its own copies
	errFile.Close()
	if err != nil {
		run.cgroup.destroy()
		return nil, fmt.Errorf("starting container-init: %w", err)
	}
	run.pid = cmd.Process.Pid
	run.startedAt = time.Now()
	writePidFile(base+".pid", run.pid)

	go func() {
		_ = cmd.Wait()
		run.exit = exitInfoOf(cmd.ProcessState)
		// When a container's main process ends, the runtime tears down
		// its pid namespace and everything in it dies; the process group
		// (and cgroup, on exit) is the nearest thing here.
		_ = syscall.Kill(-run.pid, syscall.SIGKILL)
		close(run.done)
		w.poke()
	}()

	probeCtx, cancel := context.WithCancel(context.Background())
	run.stopProbes = cancel
	run.probes = startProbes(probeCtx, pod, c, run, a, w.poke)
	return run, nil
}

// shimCommand is the exec of container-init in a new mount namespace and
// process group. Its environment is empty: the container's comes from the
// spec, and nothing of the agent's should leak in.
//
// The subcommand is named twice, as argv[0] and argv[1], so that a
// multi-tool binary finds it whether it dispatches on the name it is
// called by or on its first argument (ContainerInitMain skips the extra
// name); /proc/self/exe is whatever binary the agent runs in.
func (a *Agent) shimCommand(specPath string) *exec.Cmd {
	cmd := exec.Command(a.shimPath)
	cmd.Args = []string{"container-init", "container-init", specPath}
	cmd.Env = []string{}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if a.isolate {
		cmd.SysProcAttr.Unshareflags = syscall.CLONE_NEWNS
	}
	return cmd
}

func exitInfoOf(ps *os.ProcessState) exitInfo {
	ex := exitInfo{at: time.Now()}
	if ps == nil {
		ex.code = 128
		return ex
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		// What container runtimes report for a signal death: 128+signal.
		ex.signal = ws.Signal()
		ex.code = 128 + int32(ex.signal)
		return ex
	}
	ex.code = int32(ps.ExitCode())
	return ex
}

// finishRun turns an ended run into its terminated state and cleans up
// after it.
func (w *podWorker) finishRun(pod *corev1.Pod, rec *containerRecord, run *containerRun) *corev1.ContainerStateTerminated {
	if run.stopProbes != nil {
		run.stopProbes()
	}
	ex := run.exit
	term := &corev1.ContainerStateTerminated{
		ExitCode:    ex.code,
		Signal:      int32(ex.signal),
		StartedAt:   apiTime(run.startedAt),
		FinishedAt:  apiTime(ex.at),
		ContainerID: run.id,
	}
	startErr, _ := os.ReadFile(run.startErrFile)
	switch {
	case len(startErr) > 0:
		term.Reason, term.Message, term.ExitCode, term.Signal = "StartError", string(startErr), startErrorExitCode, 0
	case run.cgroup.oomKilled(ex.signal == syscall.SIGKILL):
		term.Reason = "OOMKilled"
	case ex.code == 0:
		term.Reason = "Completed"
	default:
		term.Reason = "Error"
	}
	if term.Reason != "StartError" {
		if c := findContainer(pod, rec.name); c != nil {
			term.Message = terminationMessage(c, run.termFile, run.logPath, run.logOffset, ex.code)
		}
	}
	run.cgroup.destroy()
	for _, f := range run.files {
		_ = os.Remove(f)
	}
	return term
}

// terminationMessage is what the container left in its termination-message
// file (at most 4096 bytes), or with FallbackToLogsOnError, an empty file
// and a failure, the end of its log: the last 80 lines, at most 2048 bytes.
func terminationMessage(c *corev1.Container, termFile, logPath string, logOffset int64, exitCode int32) string {
	data, _ := readAtMost(termFile, maxTerminationMessageBytes)
	if len(data) == 0 && exitCode != 0 && c.TerminationMessagePolicy == corev1.TerminationMessageFallbackToLogsOnError {
		data = tailLog(logPath, logOffset, maxFallbackLogBytes, maxFallbackLogLines)
	}
	return string(data)
}

func readAtMost(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, n))
}

// tailLog returns the last lines (at most maxLines, at most maxBytes) of
// the part of the log written since offset.
func tailLog(path string, offset, maxBytes int64, maxLines int) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil
	}
	start := max(offset, st.Size()-maxBytes)
	if start < 0 {
		start = 0
	}
	buf := make([]byte, st.Size()-start)
	n, _ := f.ReadAt(buf, start)
	return lastLines(buf[:n], maxLines)
}

// lastLines keeps the last n lines of data (a final newline does not start
// another line).
func lastLines(data []byte, n int) []byte {
	end := len(data)
	if end > 0 && data[end-1] == '\n' {
		end--
	}
	count := 0
	for i := end - 1; i >= 0; i-- {
		if data[i] == '\n' {
			count++
			if count == n {
				return data[i+1:]
			}
		}
	}
	return data
}

// securitySettings is what container-init applies for a securityContext.
type securitySettings struct {
	uid          *uint32
	gid          uint32
	groups       []uint32
	noNewPrivs   bool
	readOnlyRoot bool
}

// effectiveUser is the uid/gid a container runs as: its own securityContext
// over the pod's; with runAsNonRoot and no uid, the image's user, taken to
// be distroless's nonroot (65532:65532) as there is no image to ask.
func effectiveUser(pod *corev1.Pod, c *corev1.Container) (uid, gid *int64) {
	var nonRoot *bool
	if psc := pod.Spec.SecurityContext; psc != nil {
		uid, gid, nonRoot = psc.RunAsUser, psc.RunAsGroup, psc.RunAsNonRoot
	}
	if csc := c.SecurityContext; csc != nil {
		if csc.RunAsUser != nil {
			uid = csc.RunAsUser
		}
		if csc.RunAsGroup != nil {
			gid = csc.RunAsGroup
		}
		if csc.RunAsNonRoot != nil {
			nonRoot = csc.RunAsNonRoot
		}
	}
	if uid == nil && nonRoot != nil && *nonRoot {
		u := int64(nonRootDefaultUID)
		uid = &u
		if gid == nil {
			gid = &u
		}
	}
	return uid, gid
}

// securityFor resolves a container's security settings, refusing what the
// kubelet refuses (runAsNonRoot with uid 0).
func securityFor(pod *corev1.Pod, c *corev1.Container) (securitySettings, error) {
	var s securitySettings
	uid, gid := effectiveUser(pod, c)
	nonRoot := false
	if psc := pod.Spec.SecurityContext; psc != nil && psc.RunAsNonRoot != nil {
		nonRoot = *psc.RunAsNonRoot
	}
	if csc := c.SecurityContext; csc != nil {
		if csc.RunAsNonRoot != nil {
			nonRoot = *csc.RunAsNonRoot
		}
		s.noNewPrivs = csc.AllowPrivilegeEscalation != nil && !*csc.AllowPrivilegeEscalation
		s.readOnlyRoot = csc.ReadOnlyRootFilesystem != nil && *csc.ReadOnlyRootFilesystem
	}
	if nonRoot && uid != nil && *uid == 0 {
		return s, configErrorf("container's runAsUser breaks non-root policy (pod: %q, container: %s)", fmt.Sprintf("%s_%s(%s)", pod.Name, pod.Namespace, pod.UID), c.Name)
	}
	if uid == nil && gid == nil {
		return s, nil // runs as the agent's user (root), like an image without USER
	}
	u, g := uint32(0), uint32(0)
	if uid != nil {
		u = uint32(*uid)
	}
	if gid != nil {
		g = uint32(*gid)
	}
	s.uid, s.gid = &u, g
	seen := map[uint32]bool{}
	add := func(v int64) {
		if !seen[uint32(v)] {
			seen[uint32(v)] = true
			s.groups = append(s.groups, uint32(v))
		}
	}
	if psc := pod.Spec.SecurityContext; psc != nil {
		if psc.FSGroup != nil {
			add(*psc.FSGroup)
		}
		for _, sg := range psc.SupplementalGroups {
			add(sg)
		}
	}
	return s, nil
}

// containerMounts turns volumeMounts into bind mounts of the pod's volume
// directories, with subPath/subPathExpr resolved inside the volume.
func containerMounts(c *corev1.Container, vols *podVolumes, vars map[string]string) ([]initMount, error) {
	var out []initMount
	for _, vm := range c.VolumeMounts {
		src, ok := vols.paths[vm.Name]
		if !ok {
			return nil, configErrorf("volume %q of volumeMount %q not found in the pod", vm.Name, vm.MountPath)
		}
		if !filepath.IsAbs(vm.MountPath) {
			return nil, configErrorf("volumeMount path %q is not absolute", vm.MountPath)
		}
		sub := vm.SubPath
		if vm.SubPathExpr != "" {
			sub = expandVars(vm.SubPathExpr, mapLookup(vars))
		}
		if sub != "" {
			clean := filepath.Clean(sub)
			if filepath.IsAbs(clean) || clean == ".." || strings.HasPrefix(clean, "../") {
				return nil, configErrorf("subPath %q must be a relative path within the volume", sub)
			}
			src = filepath.Join(src, clean)
			// Like the kubelet, a missing subPath becomes a directory.
			if _, err := os.Lstat(src); errors.Is(err, os.ErrNotExist) {
				if err := os.MkdirAll(src, 0o777); err != nil {
					return nil, err
				}
			}
		}
		out = append(out, initMount{Source: src, Target: filepath.Clean(vm.MountPath), ReadOnly: vm.ReadOnly || vols.readOnly[vm.Name]})
	}
	sortMounts(out)
	return out, nil
}

// sortMounts orders mounts so that a parent path is mounted before what
// is mounted below it.
func sortMounts(m []initMount) {
	sort.SliceStable(m, func(i, j int) bool {
		return strings.Count(m[i].Target, "/") < strings.Count(m[j].Target, "/")
	})
}

// containerArgv applies Kubernetes' rules for command and args over the
// image's ENTRYPOINT and CMD: command replaces the ENTRYPOINT and drops
// the CMD; args alone replace the CMD. $(VAR) is expanded in both.
func containerArgv(c *corev1.Container, img imageEntry, vars map[string]string) []string {
	expand := func(in []string) []string {
		out := make([]string, len(in))
		for i, s := range in {
			out[i] = expandVars(s, mapLookup(vars))
		}
		return out
	}
	if len(c.Command) > 0 {
		return append(expand(c.Command), expand(c.Args)...)
	}
	argv := append([]string{}, img.Entrypoint...)
	if len(c.Args) > 0 {
		return append(argv, expand(c.Args)...)
	}
	return append(argv, img.Cmd...)
}

// openLog opens a container log for appending and returns the offset at
// which this run's output starts.
func openLog(path string) (*os.File, int64, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, 0, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, 0, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, st.Size(), nil
}

func writeJSON(path string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return os.WriteFile(path, raw, 0o600)
}

// writePidFile records a container's pid and kernel start time, so that an
// agent restarted after a crash can kill the orphan, and only it.
func writePidFile(path string, pid int) {
	if st, ok := processStartTime(pid); ok {
		_ = os.WriteFile(path, []byte(fmt.Sprintf("%d %d\n", pid, st)), 0o644)
	}
}

// processStartTime is field 22 of /proc/PID/stat (start time in clock
// ticks since boot), which tells a process apart from a later one that
// reuses its pid.
func processStartTime(pid int) (uint64, bool) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	s := string(raw)
	// The command name (field 2) may contain spaces; fields restart after ')'.
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	fields := strings.Fields(s[i+1:])
	if len(fields) < 20 {
		return 0, false
	}
	v, err := strconv.ParseUint(fields[19], 10, 64)
	return v, err == nil
}

// killOrphans kills containers started by an earlier agent process that
// did not stop them (it crashed or was SIGKILLed): their pid files are
// still in the pod directories.
func (a *Agent) killOrphans() {
	files, _ := filepath.Glob(filepath.Join(a.rootDir, "pods", "*", "run", "*.pid"))
	for _, f := range files {
		raw, err := os.ReadFile(f)
		_ = os.Remove(f)
		if err != nil {
			continue
		}
		var pid int
		var start uint64
		if _, err := fmt.Sscanf(string(raw), "%d %d", &pid, &start); err != nil || pid <= 1 {
			continue
		}
		if now, ok := processStartTime(pid); ok && now == start {
			a.logger.Info("killing container left by an earlier agent", "pid", pid, "pidFile", f)
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
