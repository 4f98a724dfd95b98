package nodeagent

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary stand in for the agent's own executable:
// as "container-init SPEC" it is the shim, and with NODEAGENT_HELPER set
// (by a test, in a container's env) it is a container's program.
func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == "container-init" {
		os.Exit(ContainerInitMain(os.Args[1:]))
	}
	if mode := os.Getenv("NODEAGENT_HELPER"); mode != "" {
		os.Exit(helperMain(mode))
	}
	os.Exit(m.Run())
}

// helperMain is a container program for tests.
func helperMain(mode string) int {
	switch mode {
	case "fscheck":
		// Report, one line each, what this process can write.
		err := os.WriteFile(os.Getenv("ROOT_PROBE"), []byte("x"), 0o644)
		fmt.Printf("root-write: %s\n", errName(err))
		err = os.WriteFile(os.Getenv("VOLUME_PROBE"), []byte("volume data"), 0o644)
		fmt.Printf("volume-write: %s\n", errName(err))
		err = os.WriteFile(os.Getenv("RO_VOLUME_PROBE"), []byte("x"), 0o644)
		fmt.Printf("ro-volume-write: %s\n", errName(err))
		err = os.WriteFile(os.Getenv("TERM_PATH"), []byte("goodbye from the container"), 0o644)
		fmt.Printf("termination-write: %s\n", errName(err))
		fmt.Printf("uid: %d gid: %d\n", os.Getuid(), os.Getgid())
		status, _ := os.ReadFile("/proc/self/status")
		for _, line := range strings.Split(string(status), "\n") {
			if strings.HasPrefix(line, "NoNewPrivs:") || strings.HasPrefix(line, "Groups:") {
				fmt.Println(strings.Join(strings.Fields(line), " "))
			}
		}
		wd, _ := os.Getwd()
		fmt.Printf("cwd: %s\n", wd)
		return 0
	case "alloc":
		// Touch memory until something stops us.
		var hold [][]byte
		for i := 0; i < 64; i++ {
			b := make([]byte, 16<<20)
			for j := range b {
				b[j] = byte(j)
			}
			hold = append(hold, b)
		}
		fmt.Println("allocated", len(hold)*16, "MiB")
		return 0
	case "sleep":
		fmt.Println("sleeping")
		time.Sleep(time.Hour)
		return 0
	case "term-trap":
		// Exit 0 on SIGTERM, like a well-behaved server.
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM)
		fmt.Println("waiting for SIGTERM")
		<-ch
		fmt.Println("got SIGTERM")
		return 0
	}
	fmt.Fprintln(os.Stderr, "unknown helper mode", mode)
	return 99
}

func errName(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, syscall.EROFS):
		return "EROFS"
	case errors.Is(err, syscall.EACCES):
		return "EACCES"
	}
	return err.Error()
}
