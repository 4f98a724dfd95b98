package nodeagent

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func TestTerminationMessage(t *testing.T) {
	dir := t.TempDir()
	termFile := filepath.Join(dir, "term")
	logFile := filepath.Join(dir, "c.log")
	// An earlier run's output, then this run's 100 numbered lines.
	var b strings.Builder
	b.WriteString("EARLIER RUN\n")
	offset := int64(b.Len())
	for i := 1; i <= 100; i++ {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	if err := os.WriteFile(logFile, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	fallback := &corev1.Container{TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError}
	file := &corev1.Container{TerminationMessagePolicy: corev1.TerminationMessageReadFile}

	os.WriteFile(termFile, nil, 0o644)
	msg := terminationMessage(fallback, termFile, logFile, offset, 1)
	lines := strings.Split(strings.TrimSuffix(msg, "\n"), "\n")
	if len(lines) != 80 || lines[0] != "line 21" || lines[79] != "line 100" {
		t.Fatalf("fallback message has %d lines, first %q, last %q", len(lines), lines[0], lines[len(lines)-1])
	}
	if got := terminationMessage(fallback, termFile, logFile, offset, 0); got != "" {
		t.Errorf("exit 0 must not fall back to logs, got %q", got)
	}
	if got := terminationMessage(file, termFile, logFile, offset, 1); got != "" {
		t.Errorf("File policy must not fall back to logs, got %q", got)
	}
	// Only this run's output: with 3 lines since offset, the earlier run
	// does not show.
	os.WriteFile(logFile, []byte("EARLIER RUN\nboom\npanic: x\n"), 0o644)
	if got := terminationMessage(fallback, termFile, logFile, int64(len("EARLIER RUN\n")), 2); got != "boom\npanic: x\n" {
		t.Errorf("fallback = %q", got)
	}
	// Byte cap: 2048 bytes of long lines.
	long := strings.Repeat("x", 1000) + "\n"
	os.WriteFile(logFile, []byte(strings.Repeat(long, 10)), 0o644)
	if got := terminationMessage(fallback, termFile, logFile, 0, 1); len(got) > maxFallbackLogBytes {
		t.Errorf("fallback is %d bytes", len(got))
	}

	// The file wins when it has something, capped at 4096 bytes.
	os.WriteFile(termFile, []byte(strings.Repeat("m", 5000)), 0o644)
	if got := terminationMessage(fallback, termFile, logFile, 0, 1); len(got) != maxTerminationMessageBytes {
		t.Errorf("message is %d bytes, want %d", len(got), maxTerminationMessageBytes)
	}
	os.WriteFile(termFile, []byte("done: 42 rows"), 0o644)
	if got := terminationMessage(file, termFile, logFile, 0, 0); got != "done: 42 rows" {
		t.Errorf("message %q", got)
	}
}

func TestLastLinesAndTailOffset(t *testing.T) {
	if got := string(lastLines([]byte("a\nb\nc\n"), 2)); got != "b\nc\n" {
		t.Errorf("lastLines = %q", got)
	}
	if got := string(lastLines([]byte("a\nb"), 5)); got != "a\nb" {
		t.Errorf("lastLines = %q", got)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "log")
	content := "one\ntwo\nthree\n"
	os.WriteFile(p, []byte(content), 0o644)
	f, _ := os.Open(p)
	defer f.Close()
	for n, want := range map[int]string{0: "", 1: "three\n", 2: "two\nthree\n", 3: content, 10: content} {
		if got := content[tailOffset(f, int64(len(content)), n):]; got != want {
			t.Errorf("tail %d = %q, want %q", n, got, want)
		}
	}
}
