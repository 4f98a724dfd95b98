package nodeagent

// Memory limits through cgroup v1. A container with resources.limits.memory
// runs in a memory cgroup of its own, so the kernel OOM-kills it at its
// limit exactly as on a real node, and the agent can tell the kill apart
// from any other SIGKILL by the cgroup's oom_kill counter.

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const cgroupV1MemoryRoot = "/sys/fs/cgroup/memory"

// memoryCgroups creates per-container memory cgroups under one parent
// directory of the agent (so leftovers of a crashed agent are easy to find).
type memoryCgroups struct {
	parent    string // "" when cgroup v1 memory is unavailable
	hasMemsw  bool   // swap accounting: memsw limit keeps swap from hiding OOMs
	logger    *slog.Logger
	available bool
}

// newMemoryCgroups checks for a writable cgroup v1 memory hierarchy. When
// there is none, limits are not enforced and that is logged once.
func newMemoryCgroups(logger *slog.Logger, parentName string) *memoryCgroups {
	m := &memoryCgroups{logger: logger}
	if _, err := os.Stat(filepath.Join(cgroupV1MemoryRoot, "memory.limit_in_bytes")); err != nil {
		logger.Warn("cgroup v1 memory controller not available: memory limits are not enforced and OOMKilled is never reported", "path", cgroupV1MemoryRoot)
		return m
	}
	parent := filepath.Join(cgroupV1MemoryRoot, parentName)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		logger.Warn("cannot create the agent's memory cgroup: memory limits are not enforced", "path", parent, "err", err)
		return m
	}
	_, err := os.Stat(filepath.Join(parent, "memory.memsw.limit_in_bytes"))
	m.parent, m.hasMemsw, m.available = parent, err == nil, true
	return m
}

// memoryCgroup is the cgroup of one container run.
type memoryCgroup struct {
	dir string
}

// create makes the cgroup name with a hard limit of limit bytes. Swap is
// kept out of the picture (memsw = limit, or swappiness 0) so a container
// over its limit is killed rather than slowed down.
func (m *memoryCgroups) create(name string, limit int64) (*memoryCgroup, error) {
	if !m.available {
		return nil, nil
	}
	dir := filepath.Join(m.parent, name)
	if _, err := os.Stat(dir); err == nil {
		// Left over by an earlier run of the same container: start clean,
		// its oom_kill counter would otherwise be misread.
		(&memoryCgroup{dir: dir}).destroy()
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating memory cgroup: %w", err)
	}
	cg := &memoryCgroup{dir: dir}
	if err := cg.write("memory.limit_in_bytes", strconv.FormatInt(limit, 10)); err != nil {
		cg.destroy()
		return nil, fmt.Errorf("setting memory limit: %w", err)
	}
	if m.hasMemsw {
		_ = cg.write("memory.memsw.limit_in_bytes", strconv.FormatInt(limit, 10))
	}
	_ = cg.write("memory.swappiness", "0")
	return cg, nil
}

// procsFile is the file the shim writes its pid to.
func (cg *memoryCgroup) procsFile() string { return filepath.Join(cg.dir, "cgroup.procs") }

func (cg *memoryCgroup) write(file, value string) error {
	return os.WriteFile(filepath.Join(cg.dir, file), []byte(value), 0o644)
}

// oomKilled reports whether the kernel's OOM killer acted in this cgroup:
// the oom_kill counter of memory.oom_control (kernel 4.13+), or, on older
// kernels, a SIGKILL together with a limit that was hit.
func (cg *memoryCgroup) oomKilled(sigkilled bool) bool {
	if cg == nil {
		return false
	}
	if n, ok := readKeyedValue(filepath.Join(cg.dir, "memory.oom_control"), "oom_kill"); ok {
		return n > 0
	}
	if !sigkilled {
		return false
	}
	raw, err := os.ReadFile(filepath.Join(cg.dir, "memory.failcnt"))
	if err != nil {
		return false
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(raw)), 10, 64)
	return n > 0
}

// destroy kills whatever is left in the cgroup (a container's children
// die with it, as in a pid namespace) and removes it.
func (cg *memoryCgroup) destroy() {
	if cg == nil {
		return
	}
	for attempt := 0; attempt < 50; attempt++ {
		for _, pid := range cg.pids() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		err := os.Remove(cg.dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (cg *memoryCgroup) pids() []int {
	raw, err := os.ReadFile(cg.procsFile())
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(raw)) {
		if pid, err := strconv.Atoi(f); err == nil {
			out = append(out, pid)
		}
	}
	return out
}

// removeStale destroys cgroups left by an agent that did not shut down
// cleanly; their processes belong to no pod this agent runs.
func (m *memoryCgroups) removeStale() {
	if !m.available {
		return
	}
	entries, err := os.ReadDir(m.parent)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() {
			m.logger.Info("removing stale memory cgroup", "cgroup", e.Name())
			(&memoryCgroup{dir: filepath.Join(m.parent, e.Name())}).destroy()
		}
	}
}

// readKeyedValue reads "key N" from a cgroup file of such lines.
func readKeyedValue(path, key string) (int64, bool) {
	f, err := os.Open(path)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if ok && k == key {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}
