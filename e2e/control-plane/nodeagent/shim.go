package nodeagent

// The container-init shim. The agent cannot make the changes a container
// runtime makes (private mounts, a read-only root, another uid) in its own
// process, and Go cannot run code between fork and exec, so it execs itself
// as "container-init SPEC": a short-lived process that is already in a fresh
// mount namespace (the agent sets SysProcAttr.Unshareflags = CLONE_NEWNS),
// applies the spec to itself and then execs the container's command, so the
// container process keeps the shim's pid, process group and cgroup.

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

// initSpec is what the agent writes, as JSON, for one container start (or
// one exec probe) and hands to container-init as a file path argument. It
// is a file, not an environment variable, so that nothing of it leaks into
// the container's own environment.
type initSpec struct {
	// Argv is the command; Argv[0] is an absolute path or a name looked up
	// in the PATH of Env, as a container runtime does.
	Argv       []string `json:"argv"`
	Env        []string `json:"env"`
	WorkingDir string   `json:"workingDir"`

	// Isolate is false when the agent does not run as root: then there is
	// no private mount namespace and the mount, read-only-root and user
	// fields must be empty (the agent refuses such containers).
	Isolate bool `json:"isolate"`
	// Mounts are bind mounts, applied in order (the agent sorts parents
	// before children).
	Mounts       []initMount `json:"mounts,omitempty"`
	ReadOnlyRoot bool        `json:"readOnlyRoot,omitempty"`

	// UID and GID, when UID is set, are the identity the command runs as,
	// with Groups as its supplementary groups.
	UID    *uint32  `json:"uid,omitempty"`
	GID    uint32   `json:"gid,omitempty"`
	Groups []uint32 `json:"groups,omitempty"`
	// NoNewPrivs is allowPrivilegeEscalation: false.
	NoNewPrivs bool `json:"noNewPrivs,omitempty"`

	// CgroupProcs, when set, is a cgroup.procs file the shim moves itself
	// into before anything else, so that no allocation of the container
	// escapes its memory limit.
	CgroupProcs string `json:"cgroupProcs,omitempty"`

	// StartErrorFD, when not 0, is an inherited file descriptor (opened
	// by the agent) that receives the reason when the shim cannot start
	// the command; the agent then reports the container as StartError
	// with exit code 128, as container runtimes do. It is a descriptor
	// rather than a path because the shim cannot open a file for writing
	// itself: the root may be about to become read-only, and an open
	// writable file on a mount makes its read-only remount fail (EBUSY).
	StartErrorFD int `json:"startErrorFD,omitempty"`
}

// initMount is one bind mount of a host path (a volume directory, a file of
// it, or the termination-message file) onto a path of the container's view.
type initMount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly,omitempty"`
}

// startErrorExitCode is the exit code of a container whose command could
// not be started at all, as runc/containerd report it.
const startErrorExitCode = 128

// ContainerInitMain is the hidden "container-init" subcommand. args is the
// argument list after the subcommand name: the path of the JSON spec. It
// only returns on failure (the success path execs the container command).
func ContainerInitMain(args []string) int {
	// Mount and credential changes below must all apply to the thread that
	// finally calls execve: no_new_privs is a per-thread attribute, and
	// keeping one thread makes the order of effects obvious. (Setuid and
	// friends apply to all threads anyway since Go 1.16.)
	runtime.LockOSThread()

	if len(args) > 0 && args[0] == "container-init" {
		args = args[1:] // tolerate being handed the whole os.Args tail
	}
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: container-init SPEC.json")
		return 2
	}
	raw, err := os.ReadFile(args[0])
	if err != nil {
		fmt.Fprintf(os.Stderr, "container-init: %v\n", err)
		return startErrorExitCode
	}
	var spec initSpec
	if err := json.Unmarshal(raw, &spec); err != nil {
		fmt.Fprintf(os.Stderr, "container-init: bad spec %s: %v\n", args[0], err)
		return startErrorExitCode
	}
	// The error descriptor is made close-on-exec, so a successful exec
	// leaves no trace of it in the container.
	var errFile *os.File
	if spec.StartErrorFD > 2 {
		syscall.CloseOnExec(spec.StartErrorFD)
		errFile = os.NewFile(uintptr(spec.StartErrorFD), "start-error")
	}
	if err := runContainerInit(&spec); err != nil {
		msg := err.Error()
		fmt.Fprintf(os.Stderr, "container-init: %s\n", msg)
		if errFile != nil {
			_, _ = errFile.WriteString(msg)
			_ = errFile.Close()
		}
		return startErrorExitCode
	}
	return 0 // not reached: runContainerInit execs or fails
}

// runContainerInit applies spec to the current process and execs the
// command. It returns only on error.
func runContainerInit(spec *initSpec) error {
	if len(spec.Argv) == 0 {
		return errors.New("no command given")
	}
	if spec.CgroupProcs != "" {
		pid := strconv.Itoa(os.Getpid())
		if err := os.WriteFile(spec.CgroupProcs, []byte(pid), 0o644); err != nil {
			return fmt.Errorf("joining memory cgroup: %w", err)
		}
	}
	// The command is looked up before the volumes are mounted: it stands
	// for a program of the image, which a volume mounted on /tmp must not
	// hide (the workspace's binaries may live under /tmp). It is held open
	// and executed through /proc/self/fd. A command found only once the
	// volumes are mounted (a script in a volume) is looked up after.
	imagePath := ""
	if found, err := lookPathIn(spec.Argv[0], envValue(spec.Env, "PATH")); err == nil {
		// Not close-on-exec: exec of /proc/self/fd/N needs the fd open.
		if fd, err := syscall.Open(found, unix.O_PATH, 0); err == nil {
			imagePath = fmt.Sprintf("/proc/self/fd/%d", fd)
		}
	}
	if spec.Isolate {
		if err := setUpMounts(spec); err != nil {
			return err
		}
	} else if len(spec.Mounts) > 0 || spec.ReadOnlyRoot {
		return errors.New("mounts requested without a private mount namespace")
	}
	path := imagePath
	if path == "" {
		found, err := lookPathIn(spec.Argv[0], envValue(spec.Env, "PATH"))
		if err != nil {
			return err
		}
		path = found
	}
	// chdir while still root: the default working directory is the pod
	// directory, which a non-root user could not reach by path when the
	// agent's root directory is private (it can still use it once there).
	if spec.WorkingDir != "" {
		if err := syscall.Chdir(spec.WorkingDir); err != nil {
			return fmt.Errorf("chdir to working directory %q: %w", spec.WorkingDir, err)
		}
	}
	if spec.UID != nil {
		groups := make([]int, 0, len(spec.Groups))
		for _, g := range spec.Groups {
			groups = append(groups, int(g))
		}
		// Order matters: groups and gid can only be changed while uid 0.
		if err := syscall.Setgroups(groups); err != nil {
			return fmt.Errorf("setgroups %v: %w", groups, err)
		}
		if err := syscall.Setgid(int(spec.GID)); err != nil {
			return fmt.Errorf("setgid %d: %w", spec.GID, err)
		}
		if err := syscall.Setuid(int(*spec.UID)); err != nil {
			return fmt.Errorf("setuid %d: %w", *spec.UID, err)
		}
	}
	if spec.NoNewPrivs {
		const prSetNoNewPrivs = 38
		if _, _, errno := syscall.RawSyscall6(syscall.SYS_PRCTL, prSetNoNewPrivs, 1, 0, 0, 0, 0); errno != 0 {
			return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", errno)
		}
	}
	err := syscall.Exec(path, spec.Argv, spec.Env)
	return fmt.Errorf("exec %q: %w", spec.Argv[0], err)
}

// setUpMounts builds the container's view of the host's mount table. It
// runs in a mount namespace of its own, so nothing here is seen by the host
// once propagation is turned off.
func setUpMounts(spec *initSpec) error {
	// Without this, bind mounts below would propagate back to the host's
	// shared mounts (systemd makes / shared).
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}
	// Every source is opened before anything is mounted: a volume mounted
	// on a path (an emptyDir on /tmp) would otherwise hide the sources of
	// later mounts that live below it (the pod directory under /tmp). The
	// binds then take the sources through /proc/self/fd.
	sources := make([]initMount, len(spec.Mounts))
	for i, m := range spec.Mounts {
		fd, err := syscall.Open(m.Source, unix.O_PATH|syscall.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("volume source %s: %w", m.Source, err)
		}
		defer syscall.Close(fd)
		sources[i] = m
		sources[i].Source = fmt.Sprintf("/proc/self/fd/%d", fd)
	}
	// Mount points are created before the root may become read-only, and
	// the working directory too (container runtimes create a missing one).
	for _, m := range sources {
		if err := bindMount(m); err != nil {
			return err
		}
	}
	if spec.WorkingDir != "" {
		if err := os.MkdirAll(spec.WorkingDir, 0o755); err != nil {
			return fmt.Errorf("creating working directory: %w", err)
		}
	}
	// Read-only flags are applied after all binds, from the mount table as
	// it now is, keeping each mount's nosuid/nodev/noexec/atime flags: a
	// bind remount that dropped them would fail on locked mounts.
	mounts, err := readMountInfo("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	// mountinfo shows resolved paths (/var/run/... appears as /run/... on
	// hosts where /var/run is a symlink), so compare resolved targets.
	ours := map[string]bool{}
	readOnly := map[string]bool{}
	for _, m := range spec.Mounts {
		target := m.Target
		if resolved, err := filepath.EvalSymlinks(target); err == nil {
			target = resolved
		}
		ours[target] = true
		if m.ReadOnly {
			readOnly[target] = true
		}
	}
	for _, mi := range mounts {
		switch {
		case readOnly[mi.mountPoint]:
		case ours[mi.mountPoint]:
			continue // a writable volume: stays writable under a read-only root
		case !spec.ReadOnlyRoot:
			continue
		case underAny(mi.mountPoint, []string{"/proc", "/sys", "/dev"}):
			continue // kernel file systems stay as a container runtime leaves them
		case underAny(mi.mountPoint, keys(ours)):
			continue // submounts a recursive bind brought along with a volume
		}
		flags := uintptr(syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY) | mi.flags
		if err := syscall.Mount("", mi.mountPoint, "", flags, ""); err != nil {
			if errors.Is(err, syscall.ENOENT) {
				continue // hidden by a mount on a parent path; nothing can reach it
			}
			return fmt.Errorf("remounting %s read-only: %w", mi.mountPoint, err)
		}
	}
	return nil
}

// bindMount binds m.Source on m.Target, creating the mount point (a file
// for a file, a directory otherwise) if it is missing.
func bindMount(m initMount) error {
	st, err := os.Stat(m.Source)
	if err != nil {
		return fmt.Errorf("volume source: %w", err)
	}
	if st.IsDir() {
		err = os.MkdirAll(m.Target, 0o755)
	} else {
		err = os.MkdirAll(filepath.Dir(m.Target), 0o755)
		if err == nil {
			var f *os.File
			f, err = os.OpenFile(m.Target, os.O_RDONLY|os.O_CREATE, 0o644)
			if err == nil {
				_ = f.Close()
			}
		}
	}
	if err != nil {
		return fmt.Errorf("creating mount point %s: %w", m.Target, err)
	}
	if err := syscall.Mount(m.Source, m.Target, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("bind-mounting %s on %s: %w", m.Source, m.Target, err)
	}
	return nil
}

// mountInfo is what the shim needs of one line of /proc/self/mountinfo.
type mountInfo struct {
	mountPoint string
	flags      uintptr // per-mount flags to keep on a remount
}

// readMountInfo returns one entry per mount point, the last (topmost) one
// when mounts are stacked, in the order of the file (parents first).
func readMountInfo(path string) ([]mountInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mountInfo
	index := map[string]int{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - type source superoptions
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 {
			continue
		}
		mi := mountInfo{mountPoint: unescapeMountPath(fields[4]), flags: perMountFlags(fields[5])}
		if i, ok := index[mi.mountPoint]; ok {
			out[i] = mi
			continue
		}
		index[mi.mountPoint] = len(out)
		out = append(out, mi)
	}
	return out, sc.Err()
}

// perMountFlags turns the per-mount options of mountinfo into mount(2)
// flags. The atime flags and nosuid/nodev/noexec are the ones a bind
// remount must repeat to keep them.
func perMountFlags(options string) uintptr {
	var flags uintptr
	for _, o := range strings.Split(options, ",") {
		switch o {
		case "nosuid":
			flags |= syscall.MS_NOSUID
		case "nodev":
			flags |= syscall.MS_NODEV
		case "noexec":
			flags |= syscall.MS_NOEXEC
		case "noatime":
			flags |= syscall.MS_NOATIME
		case "nodiratime":
			flags |= syscall.MS_NODIRATIME
		case "relatime":
			flags |= syscall.MS_RELATIME
		case "strictatime":
			flags |= syscall.MS_STRICTATIME
		}
	}
	return flags
}

// unescapeMountPath undoes the octal escapes (\040 for a space, ...) the
// kernel uses in mountinfo paths.
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// underAny reports whether path is one of roots or below one of them.
func underAny(path string, roots []string) bool {
	for _, r := range roots {
		if path == r || strings.HasPrefix(path, strings.TrimSuffix(r, "/")+"/") {
			return true
		}
	}
	return false
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// lookPathIn resolves a command name the way a container runtime does:
// names with a slash are used as they are, others are searched in the
// container's PATH (not the agent's).
func lookPathIn(name, pathEnv string) (string, error) {
	if strings.Contains(name, "/") {
		if err := checkExecutable(name); err != nil {
			return "", fmt.Errorf("exec: %q: %w", name, err)
		}
		return name, nil
	}
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		if checkExecutable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("exec: %q: executable file not found in $PATH", name)
}

func checkExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if st.IsDir() {
		return errors.New("is a directory")
	}
	if st.Mode()&0o111 == 0 {
		return errors.New("permission denied")
	}
	return nil
}

// envValue returns the value of name in a KEY=VALUE list (the last one
// wins, as for execve's consumers).
func envValue(env []string, name string) string {
	v := ""
	for _, kv := range env {
		if k, val, ok := strings.Cut(kv, "="); ok && k == name {
			v = val
		}
	}
	return v
}
