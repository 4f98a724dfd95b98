package nodeagent

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func TestResolvePort(t *testing.T) {
	c := &corev1.Container{Name: "web", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}
	for in, want := range map[string]int{"http": 8080, "9090": 9090} {
		if got, err := resolvePort(intstr.FromString(in), c); err != nil || got != want {
			t.Errorf("resolvePort(%q) = %d, %v", in, got, err)
		}
	}
	if got, _ := resolvePort(intstr.FromInt32(7070), c); got != 7070 {
		t.Errorf("int port = %d", got)
	}
	if _, err := resolvePort(intstr.FromString("metrics"), c); err == nil {
		t.Error("unknown named port must fail")
	}
	if threshold(0, 3) != 3 || threshold(5, 3) != 5 {
		t.Error("threshold defaults")
	}
}

func TestHTTPAndTCPChecks(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("User-Agent") != probeUserAgent || r.Header.Get("X-Check") != "1" || r.Host != "svc.local" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		switch r.URL.Path {
		case "/ok":
			w.WriteHeader(http.StatusOK)
		case "/redirect":
			http.Redirect(w, r, "/ok", http.StatusFound)
		default:
			w.WriteHeader(http.StatusInternalServerError)
		}
	}))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	port, _ := strconv.Atoi(u.Port())
	c := &corev1.Container{Name: "web", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: int32(port)}}}
	get := func(path string) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return httpCheck(ctx, &corev1.HTTPGetAction{Path: path, Port: intstr.FromString("http"),
			HTTPHeaders: []corev1.HTTPHeader{{Name: "X-Check", Value: "1"}, {Name: "Host", Value: "svc.local"}}}, c)
	}
	if !get("/ok") || !get("redirect") {
		t.Error("200 and 302 must pass")
	}
	if get("/fail") {
		t.Error("500 must fail")
	}

	pr := &prober{c: c}
	tcp := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(int32(port))}}}
	if !pr.check(context.Background(), tcp) {
		t.Error("tcp check against a listening port must pass")
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	tcp.TCPSocket.Port = intstr.FromInt32(int32(closed))
	if pr.check(context.Background(), tcp) {
		t.Error("tcp check against a closed port must fail")
	}
}

// TestReadinessThresholds drives a readiness probe against a server that
// is healthy only for a while.
func TestReadinessThresholds(t *testing.T) {
	healthy := make(chan bool, 1)
	healthy <- true
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := <-healthy
		healthy <- h
		if !h {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	port, _ := strconv.Atoi(u.Port())
	c := &corev1.Container{Name: "web", ReadinessProbe: &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt32(int32(port))}},
		PeriodSeconds: 1, FailureThreshold: 2,
	}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pokes := make(chan struct{}, 10)
	ps := startProbes(ctx, &corev1.Pod{}, c, &containerRun{startedAt: time.Now()}, nil, func() {
		select {
		case pokes <- struct{}{}:
		default:
		}
	})
	if ps.isReady() {
		t.Fatal("ready before the first probe")
	}
	waitFor(t, 5*time.Second, "ready", ps.isReady)
	<-healthy
	healthy <- false
	waitFor(t, 5*time.Second, "unready after 2 failures", func() bool { return !ps.isReady() })
	if !ps.isStarted() || ps.failedFatally() != "" {
		t.Fatal("no startup or liveness probe: started and never fatal")
	}
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
