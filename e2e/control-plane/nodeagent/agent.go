package nodeagent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

const (
	// apiCallTimeout bounds every API request of the agent.
	apiCallTimeout = 15 * time.Second
	// informerResync re-delivers every pod to its worker now and then, and
	// is also the period of the housekeeping sweep.
	informerResync = 30 * time.Second
	// cgroupParent holds each agent's directory in the memory hierarchy
	// (agentCgroupDir).
	cgroupParent = "local-node-agent"
)

// agentCgroupDir is the memory cgroup directory of the agent whose root
// directory is root: one of its own, so that the clean-up of stale cgroups
// at start (removeStale) touches only what an earlier agent of the same
// node left, never the running containers of another cluster's agent on
// the same machine (tests run several clusters side by side).
func agentCgroupDir(root string) string {
	sum := sha256.Sum256([]byte(root))
	return filepath.Join(cgroupParent, hex.EncodeToString(sum[:6]))
}

// Config is what the node-agent subcommand's flags set.
type Config struct {
	Kubeconfig   string
	NodeName     string
	RootDir      string
	ImagesFile   string
	CPU          string
	Memory       string
	Pods         string
	APIHost      string
	APIPort      int
	KubeletPort  int
	TLSCertFile  string
	TLSKeyFile   string
	ClientCAFile string
}

// Main is the node-agent subcommand. It returns the process exit code: 0
// after a clean stop on SIGTERM/SIGINT, 2 for bad flags, 1 for failures.
func Main(args []string) int {
	fs := flag.NewFlagSet("node-agent", flag.ContinueOnError)
	var cfg Config
	fs.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig of the API server (required)")
	fs.StringVar(&cfg.NodeName, "node-name", "local-node", "name of the Node object")
	fs.StringVar(&cfg.RootDir, "root-dir", "", "directory for pod directories and container logs (required)")
	fs.StringVar(&cfg.ImagesFile, "images", "", `JSON image map {"images": {"REF": {"entrypoint": ["/abs/bin", ...], "cmd": [...]}}}; empty: no image is present`)
	fs.StringVar(&cfg.CPU, "cpu", "2", "cpu capacity of the node")
	fs.StringVar(&cfg.Memory, "memory", "8Gi", "memory capacity of the node")
	fs.StringVar(&cfg.Pods, "pods", "110", "pod capacity of the node")
	fs.StringVar(&cfg.APIHost, "api-host", "", "KUBERNETES_SERVICE_HOST given to containers (default: the kubeconfig server's host)")
	fs.IntVar(&cfg.APIPort, "api-port", 0, "KUBERNETES_SERVICE_PORT given to containers (default: the kubeconfig server's port)")
	fs.IntVar(&cfg.KubeletPort, "kubelet-port", 0, "port of the node's HTTPS log endpoint on 127.0.0.1 (0: pick a free one)")
	fs.StringVar(&cfg.TLSCertFile, "tls-cert-file", "", "serving certificate of the log endpoint (empty: a self-signed one)")
	fs.StringVar(&cfg.TLSKeyFile, "tls-key-file", "", "key of --tls-cert-file")
	fs.StringVar(&cfg.ClientCAFile, "client-ca-file", "", "CA that signs the API server's client certificate (empty: accept any client)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if cfg.Kubeconfig == "" || cfg.RootDir == "" {
		fmt.Fprintln(os.Stderr, "node-agent: --kubeconfig and --root-dir are required")
		fs.Usage()
		return 2
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("component", "node-agent")

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		// After the first signal, a second one kills the agent at once
		// (default handling), for a human whose containers are slow to stop.
		<-ctx.Done()
		stop()
	}()
	a, err := NewAgent(cfg, logger)
	if err != nil {
		logger.Error("cannot start", "err", err)
		return 1
	}
	if err := a.Run(ctx); err != nil {
		logger.Error("node agent failed", "err", err)
		return 1
	}
	logger.Info("node agent stopped")
	return 0
}

// Agent is the node agent: the kubelet of one node, running pods as local
// processes.
type Agent struct {
	cfg         Config
	logger      *slog.Logger
	client      kubernetes.Interface
	nodeName    string
	rootDir     string
	images      *imageMap
	cgroups     *memoryCgroups
	volumes     *volumeBuilder
	objects     objectGetter
	capacity    corev1.ResourceList
	allocatable corev1.ResourceList
	// isolate: running as root, so containers get a private mount
	// namespace, volume mounts and other uids.
	isolate bool
	// shimPath is the executable that has the container-init subcommand.
	shimPath    string
	kubeletPort int
	listener    net.Listener

	mu        sync.Mutex
	workers   map[types.UID]*podWorker
	running   map[string]bool // "uid/container" of running containers
	podLister corelisters.PodLister
	stopping  bool // no new workers once set
	wg        sync.WaitGroup
}

// NewAgent checks the configuration and prepares an agent; Run starts it.
func NewAgent(cfg Config, logger *slog.Logger) (*Agent, error) {
	restCfg, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	restCfg.UserAgent = "local-node-agent/" + kubeletVersion
	// A test node syncs pods in bursts (a Job's pods at once); the client's
	// default of 5 requests/s would make status lag behind reality.
	restCfg.QPS, restCfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return nil, err
	}
	if u, err := url.Parse(restCfg.Host); err == nil && u.Hostname() != "" {
		if cfg.APIHost == "" {
			cfg.APIHost = u.Hostname()
		}
		if cfg.APIPort == 0 {
			cfg.APIPort = 443
			if p, err := strconv.Atoi(u.Port()); err == nil {
				cfg.APIPort = p
			}
		}
	}
	return newAgentWithClient(cfg, logger, client)
}

// newAgentWithClient is NewAgent with a given client (tests use a fake).
func newAgentWithClient(cfg Config, logger *slog.Logger, client kubernetes.Interface) (*Agent, error) {
	root, err := filepath.Abs(cfg.RootDir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(root, "pods"), 0o755); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(root, "logs"), 0o755); err != nil {
		return nil, err
	}
	images, err := newImageMap(cfg.ImagesFile)
	if err != nil {
		return nil, err
	}
	resources, err := nodeResources(cfg.CPU, cfg.Memory, cfg.Pods, root)
	if err != nil {
		return nil, fmt.Errorf("node resources: %w", err)
	}
	a := &Agent{
		cfg:         cfg,
		logger:      logger,
		client:      client,
		nodeName:    cfg.NodeName,
		rootDir:     root,
		images:      images,
		capacity:    resources,
		allocatable: resources,
		isolate:     os.Geteuid() == 0,
		shimPath:    "/proc/self/exe",
		workers:     map[types.UID]*podWorker{},
		running:     map[string]bool{},
	}
	a.objects = clientGetter{client: client, timeout: a.callContext}
	a.volumes = &volumeBuilder{client: client, objects: a.objects, allocatable: resources, timeout: a.callContext}
	if a.isolate {
		a.cgroups = newMemoryCgroups(logger, agentCgroupDir(root))
	} else {
		logger.Warn("not running as root: containers share the agent's mount table and user; pods with volumeMounts or runAsUser will not start, memory limits are not enforced")
		a.cgroups = &memoryCgroups{logger: logger}
	}
	return a, nil
}

// Run registers the node, serves logs, runs pods until ctx ends, then stops
// every container it started.
func (a *Agent) Run(ctx context.Context) error {
	// Containers of an earlier agent process that died without stopping
	// them are no one's now; the API will hear about them as
	// ContainerStatusUnknown from the pod workers.
	a.killOrphans()
	a.cgroups.removeStale()

	if err := a.listen(); err != nil {
		return err
	}

	if err := a.registerNode(ctx); err != nil {
		a.listener.Close()
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	hbCtx, hbCancel := context.WithCancel(ctx)
	defer hbCancel()
	go a.heartbeat(hbCtx)

	factory := informers.NewSharedInformerFactoryWithOptions(a.client, informerResync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.nodeName).String()
		}))
	podInformer := factory.Core().V1().Pods()
	a.podLister = podInformer.Lister()
	_, err := podInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.dispatch(ctx, obj) },
		UpdateFunc: func(_, obj any) { a.dispatch(ctx, obj) },
		DeleteFunc: func(obj any) { a.podDeleted(obj) },
	})
	if err != nil {
		return err
	}
	serverDone := make(chan error, 1)
	go func() { serverDone <- a.serveLogs(ctx) }()
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	a.logger.Info("node agent running", "node", a.nodeName, "rootDir", a.rootDir, "images", a.images.describe(), "isolated", a.isolate)

	housekeeping := time.NewTicker(informerResync)
	defer housekeeping.Stop()
	a.housekeep()
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-housekeeping.C:
			a.housekeep()
		}
	}
	a.logger.Info("stopping: stopping all containers")
	a.mu.Lock()
	a.stopping = true
	a.mu.Unlock()
	a.wg.Wait()
	factory.Shutdown()
	<-serverDone
	return nil
}

// dispatch hands an informer event to the pod's worker, starting one for
// a pod seen for the first time.
func (a *Agent) dispatch(ctx context.Context, obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.NodeName != a.nodeName {
		return
	}
	if ctx.Err() != nil {
		return
	}
	a.mu.Lock()
	if a.stopping {
		a.mu.Unlock()
		return
	}
	w, exists := a.workers[pod.UID]
	if !exists {
		w = newPodWorker(a, pod)
		a.workers[pod.UID] = w
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			w.loop(ctx)
		}()
	}
	a.mu.Unlock()
	if exists {
		w.update(pod)
	}
}

// podDeleted tells a pod's worker that its pod is gone from the API
// (deleted with grace 0 by the agent, or force-deleted by someone).
func (a *Agent) podDeleted(obj any) {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = tomb.Obj
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	a.mu.Lock()
	w := a.workers[pod.UID]
	a.mu.Unlock()
	if w != nil {
		w.markGone(pod)
	}
}

// forgetPod drops a finished worker.
func (a *Agent) forgetPod(uid types.UID) {
	a.mu.Lock()
	delete(a.workers, uid)
	a.mu.Unlock()
}

// housekeep catches what events may have missed: workers of pods that no
// longer exist, and directories of pods this node no longer has.
func (a *Agent) housekeep() {
	pods, err := a.podLister.List(labels.Everything())
	if err != nil {
		return
	}
	present := map[types.UID]bool{}
	for _, p := range pods {
		present[p.UID] = true
	}
	a.mu.Lock()
	var gone []*podWorker
	for uid, w := range a.workers {
		if !present[uid] {
			gone = append(gone, w)
		}
	}
	known := map[types.UID]bool{}
	for uid := range a.workers {
		known[uid] = true
	}
	a.mu.Unlock()
	for _, w := range gone {
		w.markGone(nil)
	}
	entries, _ := os.ReadDir(filepath.Join(a.rootDir, "pods"))
	for _, e := range entries {
		uid := types.UID(e.Name())
		if !present[uid] && !known[uid] {
			_ = os.RemoveAll(filepath.Join(a.rootDir, "pods", e.Name()))
		}
	}
}

// podDir is the pod's directory: volumes, run files, log links.
func (a *Agent) podDir(uid types.UID) string {
	return filepath.Join(a.rootDir, "pods", string(uid))
}

// logPath is a container's log file. Logs live apart from the pod
// directory so they outlive the pod (tests read them after deletion).
func (a *Agent) logPath(pod *corev1.Pod, container string) string {
	return filepath.Join(a.rootDir, "logs", fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID), container+".log")
}

func (a *Agent) setRunning(uid types.UID, container string, running bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	key := string(uid) + "/" + container
	if running {
		a.running[key] = true
	} else {
		delete(a.running, key)
	}
}

func (a *Agent) isRunning(uid types.UID, container string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.running[string(uid)+"/"+container]
}

// serviceEnv is what containers get for the kubernetes Service, as the
// kubelet derives it (here from flags: there is no Service proxying).
func (a *Agent) serviceEnv() map[string]string {
	return map[string]string{
		"KUBERNETES_SERVICE_HOST": a.cfg.APIHost,
		"KUBERNETES_SERVICE_PORT": strconv.Itoa(a.cfg.APIPort),
	}
}

// callContext bounds one API call.
func (a *Agent) callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if ctx.Err() != nil {
		// The agent is stopping; calls made while cleaning up still get
		// their own short deadline.
		ctx = context.WithoutCancel(ctx)
	}
	return context.WithTimeout(ctx, apiCallTimeout)
}
