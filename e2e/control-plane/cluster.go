package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// The layout of a cluster directory:
//
//	DIR/kubeconfig          the admin's kubeconfig (system:masters)
//	DIR/bin/                kubectl, helm, kstatus (links to this binary)
//	DIR/env                 `. DIR/env` puts bin/ on PATH and sets KUBECONFIG
//	DIR/cluster.json        ports and paths, for test harnesses
//	DIR/pki/                the cluster's CA, certificates and keys
//	DIR/etcd/               etcd's data
//	DIR/node/               the node agent's pod directories and logs
//	DIR/logs/NAME.log       each component's output; audit.log the API's audit
//	DIR/run/NAME.json|.pid  how each component was started, and its pid
type layout string

func (dir layout) path(parts ...string) string {
	return filepath.Join(append([]string{string(dir)}, parts...)...)
}

// The components in start order; `down` stops them in reverse, so the
// node agent ends its pods while the API server can still hear of it.
var componentOrder = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-agent"}

// The Service network; only the API server's own Service lives there (no
// proxy runs: the node agent's processes reach the API on loopback).
const (
	serviceCIDR = "10.0.0.0/24"
	serviceIP   = "10.0.0.1"
)

// The controllers the controller manager runs: those Jobs, Deployments,
// namespaces, service accounts, garbage collection and the aggregated
// RBAC roles need. Node IPAM, node lifecycle (the node agent keeps its
// Node Ready), volumes and cloud controllers have nothing to do here.
var controllers = []string{
	"job-controller", "ttl-after-finished-controller", "garbage-collector-controller",
	"namespace-controller", "serviceaccount-controller", "serviceaccount-token-controller",
	"root-ca-certificate-publisher-controller", "deployment-controller", "replicaset-controller",
	"endpointslice-controller", "pod-garbage-collector-controller", "resourcequota-controller",
	"clusterrole-aggregation-controller", "cronjob-controller", "disruption-controller",
}

// clusterInfo is DIR/cluster.json.
type clusterInfo struct {
	Server      string `json:"server"`
	Kubeconfig  string `json:"kubeconfig"`
	Bin         string `json:"bin"`
	EtcdPort    int    `json:"etcdPort"`
	APIPort     int    `json:"apiPort"`
	KubeletPort int    `json:"kubeletPort"`
	NodeName    string `json:"nodeName"`
	AuditLog    string `json:"auditLog"`
	NodeRoot    string `json:"nodeRoot"`
}

// The audit policy: every write at the request level (who changed what,
// when), nothing for reads. Tests read it to check which client wrote.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: ["create", "update", "patch", "delete", "deletecollection"]
- level: None
`

func runUp(args []string) int {
	flags := flag.NewFlagSet("up", flag.ContinueOnError)
	var images stringList
	flags.Var(&images, "image", "REF=PATH: run containers of image REF as the program PATH (repeatable)")
	imagesFile := flags.String("images", "", "an image map file for the node agent (JSON); --image entries are added to it")
	parentPID := flags.Int("parent-pid", 0, "stop the cluster when this process exits (test harnesses)")
	cpu := flags.String("node-cpu", "2", "the node's allocatable CPU")
	memory := flags.String("node-memory", "8Gi", "the node's allocatable memory")
	timeout := flags.Duration("timeout", 3*time.Minute, "how long to wait for the cluster to be ready")
	// Flags may come before or after DIR.
	var positional []string
	for {
		if err := flags.Parse(args); err != nil {
			return 2
		}
		if flags.NArg() == 0 {
			break
		}
		positional = append(positional, flags.Arg(0))
		args = flags.Args()[1:]
	}
	if len(positional) != 1 {
		fmt.Fprintln(os.Stderr, "usage: local-cluster up [--image REF=PATH]... [--images FILE] [--parent-pid PID] DIR")
		return 2
	}
	dir, err := filepath.Abs(positional[0])
	if err != nil {
		return fail(err)
	}
	if err := up(layout(dir), upOptions{
		images: images, imagesFile: *imagesFile, parentPID: *parentPID,
		cpu: *cpu, memory: *memory, timeout: *timeout,
	}); err != nil {
		fmt.Fprintf(os.Stderr, "local-cluster up: %v\n(component logs are in %s)\n", err, layout(dir).path("logs"))
		_ = down(layout(dir))
		return 1
	}
	fmt.Printf("cluster ready: export KUBECONFIG=%s PATH=%s:$PATH\n", layout(dir).path("kubeconfig"), layout(dir).path("bin"))
	return 0
}

type upOptions struct {
	images     []string
	imagesFile string
	parentPID  int
	cpu        string
	memory     string
	timeout    time.Duration
}

func up(dir layout, options upOptions) error {
	if _, err := os.Stat(dir.path("run")); err == nil {
		return fmt.Errorf("%s already holds a cluster (run `local-cluster down %s` first)", dir, dir)
	}
	for _, sub := range []string{"bin", "etcd", "logs", "node", "run"} {
		if err := os.MkdirAll(dir.path(sub), 0o755); err != nil {
			return err
		}
	}
	// etcd wants its data private.
	if err := os.Chmod(dir.path("etcd"), 0o700); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	pki := dir.path("pki")
	if err := makePKI(pki); err != nil {
		return err
	}
	ports, err := freePorts(4)
	if err != nil {
		return err
	}
	etcdPort, etcdPeerPort, apiPort, kubeletPort := ports[0], ports[1], ports[2], ports[3]
	server := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	// Keyed by the identity's file name; the admin's goes to DIR/kubeconfig.
	kubeconfigs := map[string]string{}
	for _, who := range []identity{adminIdentity, managerIdentity, schedulerIdentity, nodeIdentity} {
		path := dir.path("pki", who.file+".kubeconfig")
		if who.file == adminIdentity.file {
			path = dir.path("kubeconfig")
		}
		if err := writeKubeconfig(path, pki, server, who); err != nil {
			return err
		}
		kubeconfigs[who.file] = path
	}
	imageMap, err := writeImageMap(dir, options.imagesFile, options.images)
	if err != nil {
		return err
	}
	if err := os.WriteFile(dir.path("pki", "audit-policy.yaml"), []byte(auditPolicy), 0o644); err != nil {
		return err
	}
	for _, tool := range []string{"kubectl", "helm", "kstatus"} {
		if err := os.Symlink(self, dir.path("bin", tool)); err != nil {
			return err
		}
	}
	env := fmt.Sprintf("export KUBECONFIG=%q\nexport PATH=%q:\"$PATH\"\n", dir.path("kubeconfig"), dir.path("bin"))
	if err := os.WriteFile(dir.path("env"), []byte(env), 0o644); err != nil {
		return err
	}
	info := clusterInfo{
		Server: server, Kubeconfig: dir.path("kubeconfig"), Bin: dir.path("bin"),
		EtcdPort: etcdPort, APIPort: apiPort, KubeletPort: kubeletPort, NodeName: nodeName,
		AuditLog: dir.path("logs", "audit.log"), NodeRoot: dir.path("node"),
	}
	if err := writeJSON(dir.path("cluster.json"), info); err != nil {
		return err
	}

	p := func(name string) string { return filepath.Join(pki, name) }
	commands := map[string][]string{
		"etcd": {
			"--name=local", "--data-dir=" + dir.path("etcd"),
			fmt.Sprintf("--listen-client-urls=http://127.0.0.1:%d", etcdPort),
			fmt.Sprintf("--advertise-client-urls=http://127.0.0.1:%d", etcdPort),
			fmt.Sprintf("--listen-peer-urls=http://127.0.0.1:%d", etcdPeerPort),
			fmt.Sprintf("--initial-advertise-peer-urls=http://127.0.0.1:%d", etcdPeerPort),
			fmt.Sprintf("--initial-cluster=local=http://127.0.0.1:%d", etcdPeerPort),
			// A test cluster's data is thrown away; fsync only slows it.
			"--unsafe-no-fsync", "--log-level=warn",
		},
		"kube-apiserver": {
			fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", etcdPort),
			"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", apiPort),
			"--tls-cert-file=" + p("apiserver.crt"), "--tls-private-key-file=" + p("apiserver.key"),
			"--client-ca-file=" + p("ca.crt"),
			"--authorization-mode=Node,RBAC",
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + p("sa.pub"), "--service-account-signing-key-file=" + p("sa.key"),
			"--service-cluster-ip-range=" + serviceCIDR,
			// Endpoints may not hold a loopback address, and no proxy
			// would route the Service anyway.
			"--endpoint-reconciler-type=none",
			"--kubelet-client-certificate=" + p(kubeletClientIdentity.file+".crt"),
			"--kubelet-client-key=" + p(kubeletClientIdentity.file+".key"),
			"--kubelet-certificate-authority=" + p("ca.crt"),
			"--kubelet-preferred-address-types=InternalIP",
			"--audit-policy-file=" + p("audit-policy.yaml"), "--audit-log-path=" + info.AuditLog,
			"--audit-log-format=json",
		},
		"kube-controller-manager": {
			"--kubeconfig=" + kubeconfigs[managerIdentity.file],
			"--authentication-kubeconfig=" + kubeconfigs[managerIdentity.file],
			"--authorization-kubeconfig=" + kubeconfigs[managerIdentity.file],
			"--secure-port=0", "--leader-elect=false",
			// Each controller acts as its own ServiceAccount, with the
			// bootstrap RBAC roles of a real cluster.
			"--use-service-account-credentials=true",
			"--service-account-private-key-file=" + p("sa.key"), "--root-ca-file=" + p("ca.crt"),
			"--controllers=" + strings.Join(controllers, ","),
		},
		"kube-scheduler": {
			"--kubeconfig=" + kubeconfigs[schedulerIdentity.file],
			"--authentication-kubeconfig=" + kubeconfigs[schedulerIdentity.file],
			"--authorization-kubeconfig=" + kubeconfigs[schedulerIdentity.file],
			"--secure-port=0", "--leader-elect=false",
		},
		"node-agent": {
			"--kubeconfig=" + kubeconfigs[nodeIdentity.file], "--node-name=" + nodeName,
			"--root-dir=" + dir.path("node"), "--images=" + imageMap,
			"--cpu=" + options.cpu, "--memory=" + options.memory,
			"--api-host=127.0.0.1", fmt.Sprintf("--api-port=%d", apiPort),
			fmt.Sprintf("--kubelet-port=%d", kubeletPort),
			"--tls-cert-file=" + p("kubelet.crt"), "--tls-key-file=" + p("kubelet.key"),
			"--client-ca-file=" + p("ca.crt"),
		},
	}
	for _, name := range componentOrder {
		if err := writeJSON(dir.path("run", name+".json"), append([]string{self, name}, commands[name]...)); err != nil {
			return err
		}
	}
	if options.parentPID > 0 {
		if _, err := startDetached(dir, "watch-parent", []string{self, "watch-parent", string(dir), strconv.Itoa(options.parentPID)}); err != nil {
			return err
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), options.timeout)
	defer cancel()
	exited := map[string]<-chan error{}
	for _, name := range componentOrder {
		done, err := startComponent(dir, name)
		if err != nil {
			return err
		}
		exited[name] = done
		var ready func(context.Context) error
		switch name {
		case "etcd":
			ready = func(ctx context.Context) error { return etcdHealthy(ctx, etcdPort) }
		case "kube-apiserver":
			ready = func(ctx context.Context) error { return apiReady(ctx, dir) }
		}
		if ready != nil {
			if err := waitFor(ctx, name, exited[name], ready); err != nil {
				return err
			}
		}
	}
	// The cluster is usable once a pod can be admitted and run: the node
	// is Ready and the default namespace has its ServiceAccount and CA.
	return waitFor(ctx, "the node and the default ServiceAccount", anyExit(exited), func(ctx context.Context) error {
		return clusterSettled(ctx, dir)
	})
}

// startComponent starts one component from DIR/run/NAME.json and reports
// its exit on the returned channel.
func startComponent(dir layout, name string) (<-chan error, error) {
	var argv []string
	if err := readJSON(dir.path("run", name+".json"), &argv); err != nil {
		return nil, err
	}
	return startDetached(dir, name, argv)
}

// startDetached runs argv in its own session (so it outlives `up` and a
// terminal's signals), output appended to DIR/logs/NAME.log, pid in
// DIR/run/NAME.pid.
func startDetached(dir layout, name string, argv []string) (<-chan error, error) {
	logFile, err := os.OpenFile(dir.path("logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	command := exec.Command(argv[0], argv[1:]...)
	command.Stdout, command.Stderr = logFile, logFile
	command.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := command.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	if err := os.WriteFile(dir.path("run", name+".pid"), []byte(strconv.Itoa(command.Process.Pid)), 0o644); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- command.Wait() }()
	return done, nil
}

func waitFor(ctx context.Context, what string, exited <-chan error, ready func(context.Context) error) error {
	var last error
	for {
		attempt, cancel := context.WithTimeout(ctx, 5*time.Second)
		last = ready(attempt)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("waiting for %s: a component exited (%v)", what, err)
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %v", what, last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func anyExit(exited map[string]<-chan error) <-chan error {
	any := make(chan error, len(exited))
	for name, done := range exited {
		go func(name string, done <-chan error) {
			err := <-done
			any <- fmt.Errorf("%s: %v", name, err)
		}(name, done)
	}
	return any
}

func etcdHealthy(ctx context.Context, port int) error {
	request, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/health", port), nil)
	if err != nil {
		return err
	}
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		return err
	}
	defer response.Body.Close()
	if response.StatusCode != http.StatusOK {
		return fmt.Errorf("etcd /health: %s", response.Status)
	}
	return nil
}

func adminClient(dir layout) (*kubernetes.Clientset, error) {
	config, err := clientcmd.BuildConfigFromFlags("", dir.path("kubeconfig"))
	if err != nil {
		return nil, err
	}
	config.Timeout = 10 * time.Second
	return kubernetes.NewForConfig(config)
}

func apiReady(ctx context.Context, dir layout) error {
	client, err := adminClient(dir)
	if err != nil {
		return err
	}
	body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if err != nil {
		return fmt.Errorf("/readyz: %v %s", err, body)
	}
	return nil
}

func clusterSettled(ctx context.Context, dir layout) error {
	client, err := adminClient(dir)
	if err != nil {
		return err
	}
	node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("node %s: %v", nodeName, err)
	}
	ready := false
	for _, condition := range node.Status.Conditions {
		ready = ready || (condition.Type == corev1.NodeReady && condition.Status == corev1.ConditionTrue)
	}
	if !ready {
		return fmt.Errorf("node %s is not Ready", nodeName)
	}
	if _, err := client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
		return fmt.Errorf("ServiceAccount default/default: %v", err)
	}
	if _, err := client.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{}); err != nil {
		return fmt.Errorf("ConfigMap default/kube-root-ca.crt: %v", err)
	}
	return nil
}

func runDown(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: local-cluster down DIR")
		return 2
	}
	dir, err := filepath.Abs(args[0])
	if err != nil {
		return fail(err)
	}
	if err := down(layout(dir)); err != nil {
		return fail(err)
	}
	return 0
}

// down stops every component, newest first, and removes DIR/run so the
// directory can hold a new cluster; data and logs stay for a post-mortem.
func down(dir layout) error {
	for i := len(componentOrder) - 1; i >= 0; i-- {
		stopComponent(dir, componentOrder[i], 20*time.Second)
	}
	stopComponent(dir, "watch-parent", time.Second)
	return os.RemoveAll(dir.path("run"))
}

// stopComponent sends SIGTERM to a component's process group, then
// SIGKILL once the grace is over.
func stopComponent(dir layout, name string, grace time.Duration) {
	pidText, err := os.ReadFile(dir.path("run", name+".pid"))
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(pidText)))
	if err != nil || pid <= 0 {
		return
	}
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for processAlive(pid) && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	for i := 0; processAlive(pid) && i < 50; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	_ = os.Remove(dir.path("run", name+".pid"))
}

// processAlive is false for a process that is gone or a zombie (exited
// but not yet reaped by a parent that still runs).
func processAlive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	return len(fields) > 0 && fields[0] != "Z"
}

// `stop DIR NAME` and `start DIR NAME`: one component down and up again,
// with the arguments it was first started with (tests of an API server
// outage, of a node agent restart).
func runStop(args []string) int {
	if len(args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: local-cluster stop DIR COMPONENT")
		return 2
	}
	dir, name := layout(args[0]), args[1]
	if _, err := os.Stat(dir.path("run", name+".json")); err != nil {
		return fail(fmt.Errorf("no component %q in %s", name, dir))
	}
	stopComponent(dir, name, 20*time.Second)
	return 0
}

func runStart(args []string) int {
	if len(args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: local-cluster start DIR COMPONENT")
		return 2
	}
	dir, name := layout(args[0]), args[1]
	if pidText, err := os.ReadFile(dir.path("run", name+".pid")); err == nil {
		if pid, _ := strconv.Atoi(strings.TrimSpace(string(pidText))); pid > 0 && processAlive(pid) {
			return fail(fmt.Errorf("%s is running (pid %d)", name, pid))
		}
	}
	exited, err := startComponent(dir, name)
	if err != nil {
		return fail(err)
	}
	if name == "kube-apiserver" {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := waitFor(ctx, name, exited, func(ctx context.Context) error { return apiReady(ctx, dir) }); err != nil {
			return fail(err)
		}
	}
	return 0
}

// runWatchParent stops the cluster when the given process exits, so a
// test binary that dies (or never runs its teardown) leaves nothing behind.
func runWatchParent(args []string) int {
	if len(args) != 2 {
		return 2
	}
	pid, err := strconv.Atoi(args[1])
	if err != nil {
		return 2
	}
	dir := layout(args[0])
	for processAlive(pid) {
		if _, err := os.Stat(dir.path("run")); errors.Is(err, os.ErrNotExist) {
			return 0
		}
		time.Sleep(time.Second)
	}
	fmt.Fprintf(os.Stderr, "process %d exited: stopping the cluster in %s\n", pid, dir)
	// This process is one of those down stops; drop its pid file first.
	_ = os.Remove(dir.path("run", "watch-parent.pid"))
	if err := down(dir); err != nil {
		return fail(err)
	}
	return 0
}

// writeImageMap writes DIR/images.json: the entries of --images plus each
// --image REF=PATH, the node agent's list of the images it can "pull".
func writeImageMap(dir layout, file string, entries []string) (string, error) {
	type image struct {
		Entrypoint []string `json:"entrypoint"`
	}
	imageMap := struct {
		Images map[string]image `json:"images"`
	}{Images: map[string]image{}}
	if file != "" {
		if err := readJSON(file, &imageMap); err != nil {
			return "", fmt.Errorf("--images %s: %w", file, err)
		}
	}
	for _, entry := range entries {
		ref, path, ok := strings.Cut(entry, "=")
		if !ok || ref == "" || !filepath.IsAbs(path) {
			return "", fmt.Errorf("--image %q: want REF=/absolute/path", entry)
		}
		imageMap.Images[ref] = image{Entrypoint: []string{path}}
	}
	path := dir.path("images.json")
	return path, writeJSON(path, imageMap)
}

func freePorts(n int) ([]int, error) {
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func writeJSON(path string, value interface{}) error {
	data, err := json.MarshalIndent(value, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

func readJSON(path string, value interface{}) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(data, value)
}

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func fail(err error) int {
	fmt.Fprintln(os.Stderr, "local-cluster:", err)
	return 1
}
