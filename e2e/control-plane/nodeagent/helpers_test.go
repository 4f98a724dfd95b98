package nodeagent

import (
	"k8s.io/apimachinery/pkg/runtime"
	"log/slog"
	"testing"
)

// testLogger sends the agent's log lines to the test log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p[:len(p)-1]))
	return len(p), nil
}

// runtimeObject is what the fake clientset is seeded with.
type runtimeObject = runtime.Object
