package nodeagent

// Startup, readiness and liveness probes with the kubelet's timing and
// thresholds. Every pod shares the host's network, so probes go to
// 127.0.0.1; exec probes run through container-init with the container's
// mounts and user, so they see what the container sees.

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probeUserAgent is what the kubelet sends with HTTP probes.
const probeUserAgent = "kube-probe/1.37"

// probeSet holds the probe results of one container run. A nil *probeSet
// (no probes) is started and ready.
type probeSet struct {
	startup, readiness, liveness *corev1.Probe

	started atomic.Bool
	ready   atomic.Bool
	mu      sync.Mutex
	fatal   string // "liveness" or "startup" once the container must be killed
}

func (ps *probeSet) isStarted() bool { return ps == nil || ps.started.Load() }
func (ps *probeSet) isReady() bool   { return ps == nil || ps.ready.Load() }

// failedFatally names the probe that wants the container killed, if any.
func (ps *probeSet) failedFatally() string {
	if ps == nil {
		return ""
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return ps.fatal
}

func (ps *probeSet) probe(which string) *corev1.Probe {
	if which == "startup" {
		return ps.startup
	}
	return ps.liveness
}

// prober runs the checks of one container run.
type prober struct {
	pod   *corev1.Pod
	c     *corev1.Container
	run   *containerRun
	agent *Agent
}

// startProbes starts the probe goroutines of a run; they end with ctx
// (cancelled when the run ends). poke wakes the pod worker on changes.
func startProbes(ctx context.Context, pod *corev1.Pod, c *corev1.Container, run *containerRun, a *Agent, poke func()) *probeSet {
	if c.StartupProbe == nil && c.ReadinessProbe == nil && c.LivenessProbe == nil {
		return nil
	}
	ps := &probeSet{startup: c.StartupProbe, readiness: c.ReadinessProbe, liveness: c.LivenessProbe}
	// Without a readiness probe a started container is ready; with one it
	// is not until the probe succeeds.
	ps.ready.Store(c.ReadinessProbe == nil)
	pr := &prober{pod: pod, c: c, run: run, agent: a}
	setFatal := func(which string) {
		ps.mu.Lock()
		ps.fatal = which
		ps.mu.Unlock()
		poke()
	}
	go func() {
		if ps.startup != nil {
			// Readiness and liveness wait until the startup probe passes.
			ok := pr.loop(ctx, ps.startup, func(success bool, successes, failures int32) bool {
				if success {
					return false
				}
				if failures >= threshold(ps.startup.FailureThreshold, 3) {
					setFatal("startup")
					return false
				}
				return true
			})
			if !ok {
				return
			}
		}
		ps.started.Store(true)
		poke()
		if ps.readiness != nil {
			go pr.loop(ctx, ps.readiness, func(success bool, successes, failures int32) bool {
				was := ps.ready.Load()
				switch {
				case success && successes >= threshold(ps.readiness.SuccessThreshold, 1):
					ps.ready.Store(true)
				case !success && failures >= threshold(ps.readiness.FailureThreshold, 3):
					ps.ready.Store(false)
				}
				if was != ps.ready.Load() {
					poke()
				}
				return true
			})
		}
		if ps.liveness != nil {
			go pr.loop(ctx, ps.liveness, func(success bool, successes, failures int32) bool {
				if !success && failures >= threshold(ps.liveness.FailureThreshold, 3) {
					setFatal("liveness")
					return false
				}
				return true
			})
		}
	}()
	return ps
}

// loop runs a probe every periodSeconds after initialDelaySeconds (counted
// from the container's start) and hands each result with the consecutive
// success/failure counts to handle until it returns false. It returns
// whether the last result was a success (false if ctx ended first).
func (pr *prober) loop(ctx context.Context, p *corev1.Probe, handle func(success bool, successes, failures int32) bool) bool {
	delay := time.Until(pr.run.startedAt.Add(time.Duration(p.InitialDelaySeconds) * time.Second))
	if !sleepCtx(ctx, delay) {
		return false
	}
	period := time.Duration(threshold(p.PeriodSeconds, 10)) * time.Second
	var successes, failures int32
	for {
		success := pr.check(ctx, p)
		if ctx.Err() != nil {
			return false
		}
		if success {
			successes, failures = successes+1, 0
		} else {
			successes, failures = 0, failures+1
		}
		if !handle(success, successes, failures) {
			return success
		}
		if !sleepCtx(ctx, period) {
			return false
		}
	}
}

// check runs the probe's handler once.
func (pr *prober) check(ctx context.Context, p *corev1.Probe) bool {
	timeout := time.Duration(threshold(p.TimeoutSeconds, 1)) * time.Second
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case p.Exec != nil:
		return pr.execCheck(ctx, p.Exec.Command, timeout)
	case p.HTTPGet != nil:
		return httpCheck(ctx, p.HTTPGet, pr.c)
	case p.TCPSocket != nil:
		port, err := resolvePort(p.TCPSocket.Port, pr.c)
		if err != nil {
			return false
		}
		host := p.TCPSocket.Host
		if host == "" {
			host = nodeIP
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return false
		}
		conn.Close()
		return true
	case p.GRPC != nil:
		return grpcCheck(ctx, p.GRPC)
	}
	return false
}

// execCheck runs the probe command through container-init with the
// container's spec (mounts, user, env), and succeeds on exit code 0.
func (pr *prober) execCheck(ctx context.Context, command []string, timeout time.Duration) bool {
	spec := pr.run.spec
	vars := map[string]string{}
	for _, kv := range spec.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			vars[k] = v
		}
	}
	spec.Argv = make([]string, len(command))
	for i, s := range command {
		spec.Argv[i] = expandVars(s, mapLookup(vars))
	}
	spec.StartErrorFD = 0
	f, err := os.CreateTemp(filepath.Join(pr.agent.podDir(pr.pod.UID), "run"), pr.c.Name+"-probe-*.json")
	if err != nil {
		return false
	}
	f.Close()
	defer os.Remove(f.Name())
	if err := writeJSON(f.Name(), spec); err != nil {
		return false
	}
	cmd := pr.agent.shimCommand(f.Name())
	if err := cmd.Start(); err != nil {
		return false
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err == nil
	case <-ctx.Done():
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return false
	}
}

// httpCheck succeeds on a status from 200 to 399, as the kubelet's.
func httpCheck(ctx context.Context, g *corev1.HTTPGetAction, c *corev1.Container) bool {
	port, err := resolvePort(g.Port, c)
	if err != nil {
		return false
	}
	scheme := strings.ToLower(string(g.Scheme))
	if scheme == "" {
		scheme = "http"
	}
	host := g.Host
	if host == "" {
		host = nodeIP
	}
	path := g.Path
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), path), nil)
	if err != nil {
		return false
	}
	req.Header.Set("User-Agent", probeUserAgent)
	for _, h := range g.HTTPHeaders {
		if strings.EqualFold(h.Name, "Host") {
			req.Host = h.Value
			continue
		}
		req.Header.Add(h.Name, h.Value)
	}
	client := &http.Client{Transport: &http.Transport{
		// Probes do not verify certificates, as the kubelet's do not.
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec
		DisableKeepAlives: true,
	}}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	return resp.StatusCode >= 200 && resp.StatusCode < 400
}

// grpcCheck asks the standard gRPC health service; SERVING is success.
func grpcCheck(ctx context.Context, g *corev1.GRPCAction) bool {
	conn, err := grpc.NewClient(net.JoinHostPort(nodeIP, strconv.Itoa(int(g.Port))), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return false
	}
	defer conn.Close()
	service := ""
	if g.Service != nil {
		service = *g.Service
	}
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	return err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING
}

// resolvePort turns a probe port (a number or the name of a container
// port) into a number.
func resolvePort(p intstr.IntOrString, c *corev1.Container) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil {
		return n, nil
	}
	return 0, fmt.Errorf("port %q not found in container %s", p.StrVal, c.Name)
}

// threshold applies a probe field's default when unset (0).
func threshold(v, def int32) int32 {
	if v <= 0 {
		return def
	}
	return v
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
