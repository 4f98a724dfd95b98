package nodeagent

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

var runShimExtra []*os.File

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mount namespaces, bind mounts, setuid)")
	}
}

// runShim runs the test binary as container-init with spec, the way the
// agent does, and returns the container's output and exit status.
func runShim(t *testing.T, spec initSpec) (string, *os.ProcessState) {
	t.Helper()
	return runShimWithErrFile(t, spec, "")
}

func runShimWithErrFile(t *testing.T, spec initSpec, errPath string) (string, *os.ProcessState) {
	t.Helper()
	dir := t.TempDir()
	if errPath != "" {
		f, err := os.Create(errPath)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		spec.StartErrorFD = 3
		defer func() { spec.StartErrorFD = 0 }()
		runShimExtra = []*os.File{f}
		defer func() { runShimExtra = nil }()
	}
	specPath := filepath.Join(dir, "spec.json")
	if err := writeJSON(specPath, spec); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	a := &Agent{shimPath: self, isolate: spec.Isolate}
	cmd := a.shimCommand(specPath)
	cmd.ExtraFiles = runShimExtra
	out, _ := cmd.CombinedOutput()
	return string(out), cmd.ProcessState
}

// TestContainerInitReadOnlyRootAndVolumes checks the shim for real: in a
// private mount namespace with readOnlyRootFilesystem, the host root is
// read-only (EROFS) while a writable emptyDir mount and the
// termination-message file are writable and land in the pod directory,
// and a read-only volume mount is read-only. The host's root stays
// writable afterwards (the remounts were per-namespace bind remounts).
func TestContainerInitReadOnlyRootAndVolumes(t *testing.T) {
	requireRoot(t)
	podDir := t.TempDir()
	emptyDir := filepath.Join(podDir, "volumes", "scratch")
	roDir := filepath.Join(podDir, "volumes", "config")
	for _, d := range []string{emptyDir, roDir} {
		if err := os.MkdirAll(d, 0o777); err != nil {
			t.Fatal(err)
		}
	}
	termFile := filepath.Join(podDir, "termination-log")
	if err := os.WriteFile(termFile, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	mountBase := filepath.Join(t.TempDir(), "container-view")
	rootProbe := filepath.Join(os.TempDir(), "nodeagent-root-probe-"+strings.ReplaceAll(t.Name(), "/", "_"))
	_ = os.Remove(rootProbe)
	self, _ := os.Executable()
	spec := initSpec{
		Argv: []string{self},
		Env: []string{
			"NODEAGENT_HELPER=fscheck",
			"ROOT_PROBE=" + rootProbe,
			"VOLUME_PROBE=" + mountBase + "/scratch/file",
			"RO_VOLUME_PROBE=" + mountBase + "/config/file",
			"TERM_PATH=" + mountBase + "/termination-log",
		},
		WorkingDir: podDir,
		Isolate:    true,
		Mounts: []initMount{
			{Source: emptyDir, Target: mountBase + "/scratch"},
			{Source: roDir, Target: mountBase + "/config", ReadOnly: true},
			{Source: termFile, Target: mountBase + "/termination-log"},
		},
		ReadOnlyRoot: true,
	}
	errPath := filepath.Join(podDir, "start-error")
	out, st := runShimWithErrFile(t, spec, errPath)
	t.Logf("container output:\n%s", out)
	if !st.Success() {
		t.Fatalf("container failed: %v", st)
	}
	for _, want := range []string{
		"root-write: EROFS",
		"volume-write: ok",
		"ro-volume-write: EROFS",
		"termination-write: ok",
		"uid: 0 gid: 0",
		"cwd: " + podDir,
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("output lacks %q", want)
		}
	}
	if data, _ := os.ReadFile(filepath.Join(emptyDir, "file")); string(data) != "volume data" {
		t.Errorf("emptyDir file on the host = %q", data)
	}
	if msg, _ := os.ReadFile(termFile); string(msg) != "goodbye from the container" {
		t.Errorf("termination message file = %q", msg)
	}
	// Nothing leaked to the host: the mount points are plain directories
	// and the host root is still writable.
	if _, err := os.Stat(filepath.Join(mountBase, "scratch", "file")); err == nil {
		t.Errorf("the container's bind mount is visible on the host")
	}
	if err := os.WriteFile(rootProbe, []byte("host"), 0o644); err != nil {
		t.Fatalf("host root became read-only: %v", err)
	}
	os.Remove(rootProbe)
	if data, _ := os.ReadFile(errPath); len(data) > 0 {
		t.Errorf("start error written on success: %q", data)
	}
}

// TestContainerInitUserAndNoNewPrivs checks the credential switch: uid,
// gid, supplementary groups and no_new_privs.
func TestContainerInitUserAndNoNewPrivs(t *testing.T) {
	requireRoot(t)
	// The test binary's directory is private to root, so the command is
	// /bin/sh reading /proc/self/status.
	uid := uint32(65532)
	out, st := runShim(t, initSpec{
		Argv:       []string{"sh", "-c", "id -u; id -g; grep -E '^(NoNewPrivs|Groups):' /proc/self/status | tr -s '\t ' ' '"},
		Env:        []string{"PATH=/usr/bin:/bin"},
		WorkingDir: "/",
		Isolate:    true,
		UID:        &uid,
		GID:        1234,
		Groups:     []uint32{2000, 3000},
		NoNewPrivs: true,
	})
	t.Logf("output:\n%s", out)
	if !st.Success() {
		t.Fatalf("container failed: %v", st)
	}
	for _, want := range []string{"65532\n", "1234\n", "NoNewPrivs: 1", "Groups: 2000 3000"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

// TestContainerInitStartError checks that a command that cannot be
// executed ends with exit code 128 and a start-error message.
func TestContainerInitStartError(t *testing.T) {
	requireRoot(t)
	errFile := filepath.Join(t.TempDir(), "start-error")
	_, st := runShimWithErrFile(t, initSpec{
		Argv: []string{"/nonexistent/binary"}, Env: []string{"PATH=/bin"}, WorkingDir: "/",
		Isolate: true, ReadOnlyRoot: true,
	}, errFile)
	if st.ExitCode() != startErrorExitCode {
		t.Fatalf("exit code %d, want %d", st.ExitCode(), startErrorExitCode)
	}
	msg, _ := os.ReadFile(errFile)
	if !strings.Contains(string(msg), "/nonexistent/binary") {
		t.Fatalf("start error %q does not name the command", msg)
	}
}

// TestContainerInitOOMKill runs a program that allocates 1 GiB in a
// memory cgroup limited to 64 MiB: the kernel kills it, and the cgroup's
// counters tell it was an OOM kill.
func TestContainerInitOOMKill(t *testing.T) {
	requireRoot(t)
	cgs := newMemoryCgroups(testLogger(t), "local-node-agent-test")
	if !cgs.available {
		t.Skip("no cgroup v1 memory controller")
	}
	defer os.Remove(cgs.parent)
	cg, err := cgs.create("oom-"+strings.ReplaceAll(time.Now().Format("150405.000"), ".", ""), 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.destroy()
	self, _ := os.Executable()
	out, st := runShim(t, initSpec{
		Argv: []string{self}, Env: []string{"NODEAGENT_HELPER=alloc"}, WorkingDir: "/",
		Isolate: true, CgroupProcs: cg.procsFile(),
	})
	ws := st.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("want SIGKILL, got %v (output %q)", st, out)
	}
	if !cg.oomKilled(true) {
		t.Fatal("cgroup does not report an OOM kill")
	}
}

func TestLookPathIn(t *testing.T) {
	if p, err := lookPathIn("sh", "/nonexistent:/bin"); err != nil || p != "/bin/sh" {
		t.Fatalf("lookPathIn(sh) = %q, %v", p, err)
	}
	if _, err := lookPathIn("no-such-command-xyz", "/bin"); err == nil {
		t.Fatal("want an error for a missing command")
	}
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("no sh")
	}
}

func TestUnescapeMountPath(t *testing.T) {
	if got := unescapeMountPath(`/mnt/with\040space`); got != "/mnt/with space" {
		t.Fatalf("got %q", got)
	}
	if got := perMountFlags("rw,nosuid,nodev,relatime"); got != syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_RELATIME {
		t.Fatalf("flags %#x", got)
	}
}
