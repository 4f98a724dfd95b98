package nodeagent

// End-to-end tests of the agent against a fake clientset: real processes,
// real mounts and cgroups (as root), statuses checked as the Job
// controller would read them.

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

const (
	testNS        = "default"
	helperImage   = "test/helper:1"
	shellImage    = "busybox:test"
	missingImage  = "registry.example/missing:v1"
	testNodeName  = "local-node"
	statusTimeout = 30 * time.Second
)

type agentFixture struct {
	t      *testing.T
	agent  *Agent
	client *fake.Clientset
	root   string
}

func startAgent(t *testing.T) *agentFixture {
	t.Helper()
	requireRoot(t)
	root := t.TempDir()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	images := filepath.Join(root, "images.json")
	if err := os.WriteFile(images, []byte(fmt.Sprintf(`{"images": {
		%q: {"entrypoint": [%q]},
		%q: {"entrypoint": ["/bin/sh", "-c"]}
	}}`, helperImage, self, shellImage)), 0o644); err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset()
	// The TokenRequest subresource, as the API server answers it.
	client.PrependReactor("create", "serviceaccounts", func(action k8stesting.Action) (bool, runtime.Object, error) {
		ca, ok := action.(k8stesting.CreateAction)
		if !ok || action.GetSubresource() != "token" {
			return false, nil, nil
		}
		tr := ca.GetObject().(*authenticationv1.TokenRequest).DeepCopy()
		ref := tr.Spec.BoundObjectRef
		tr.Status.Token = fmt.Sprintf("token-for-%s/%s", ref.Kind, ref.Name)
		tr.Status.ExpirationTimestamp = metav1.NewTime(time.Now().Add(time.Hour))
		return true, tr, nil
	})
	a, err := newAgentWithClient(Config{
		NodeName: testNodeName, RootDir: filepath.Join(root, "node"), ImagesFile: images,
		CPU: "2", Memory: "8Gi", Pods: "110", APIHost: "127.0.0.1", APIPort: 6443,
	}, testLogger(t), client)
	if err != nil {
		t.Fatal(err)
	}
	// Mount points the containers of these tests create on the host.
	// (/dev/termination-log stays: other agents on this machine may use it
	// as a mount point, and unlinking it would detach their mounts.)
	hostMountPoints := []string{"/tmp/nodeagent-full", "/tmp/nodeagent-test-data"}
	var created []string
	for _, p := range hostMountPoints {
		if _, err := os.Lstat(p); os.IsNotExist(err) {
			created = append(created, p)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		defer func() {
			for _, p := range created {
				_ = os.RemoveAll(p)
			}
		}()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Errorf("agent did not stop")
		}
	})
	f := &agentFixture{t: t, agent: a, client: client, root: root}
	f.waitNodeReady()
	return f
}

func (f *agentFixture) waitNodeReady() {
	f.t.Helper()
	waitFor(f.t, statusTimeout, "node registration", func() bool {
		n, err := f.client.CoreV1().Nodes().Get(context.Background(), testNodeName, metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				return true
			}
		}
		return false
	})
}

// createPod binds a pod to the node (as the scheduler would have).
func (f *agentFixture) createPod(pod *corev1.Pod) *corev1.Pod {
	f.t.Helper()
	pod.Namespace = testNS
	pod.UID = types.UID("uid-" + pod.Name)
	pod.Spec.NodeName = testNodeName
	if pod.Spec.RestartPolicy == "" {
		pod.Spec.RestartPolicy = corev1.RestartPolicyNever
	}
	created, err := f.client.CoreV1().Pods(testNS).Create(context.Background(), pod, metav1.CreateOptions{})
	if err != nil {
		f.t.Fatal(err)
	}
	return created
}

func (f *agentFixture) getPod(name string) *corev1.Pod {
	p, err := f.client.CoreV1().Pods(testNS).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	return p
}

// waitPod waits until cond holds for the pod and returns it.
func (f *agentFixture) waitPod(name, what string, cond func(*corev1.Pod) bool) *corev1.Pod {
	f.t.Helper()
	var last *corev1.Pod
	deadline := time.Now().Add(statusTimeout)
	for time.Now().Before(deadline) {
		if p := f.getPod(name); p != nil {
			last = p
			if cond(p) {
				return p
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if last != nil {
		f.t.Fatalf("pod %s: timed out waiting for %s; status: %s", name, what, statusSummary(last))
	}
	f.t.Fatalf("pod %s: timed out waiting for %s; pod not found", name, what)
	return nil
}

func statusSummary(p *corev1.Pod) string {
	var b strings.Builder
	fmt.Fprintf(&b, "phase=%s reason=%s", p.Status.Phase, p.Status.Reason)
	for _, cs := range append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
		fmt.Fprintf(&b, " [%s restarts=%d ready=%v", cs.Name, cs.RestartCount, cs.Ready)
		switch {
		case cs.State.Waiting != nil:
			fmt.Fprintf(&b, " waiting %s: %s", cs.State.Waiting.Reason, cs.State.Waiting.Message)
		case cs.State.Running != nil:
			b.WriteString(" running")
		case cs.State.Terminated != nil:
			fmt.Fprintf(&b, " terminated %d %s: %q", cs.State.Terminated.ExitCode, cs.State.Terminated.Reason, cs.State.Terminated.Message)
		}
		b.WriteString("]")
	}
	return b.String()
}

func phaseIs(phase corev1.PodPhase) func(*corev1.Pod) bool {
	return func(p *corev1.Pod) bool { return p.Status.Phase == phase }
}

func condition(p *corev1.Pod, t corev1.PodConditionType) corev1.ConditionStatus {
	for _, c := range p.Status.Conditions {
		if c.Type == t {
			return c.Status
		}
	}
	return ""
}

func shellPod(name, script string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "main", Image: shellImage, Args: []string{script},
		}}},
	}
}

func helperPod(name, mode string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "main", Image: helperImage, Env: []corev1.EnvVar{{Name: "NODEAGENT_HELPER", Value: mode}},
		}}},
	}
}

func TestAgentPodLifecycles(t *testing.T) {
	f := startAgent(t)

	node, _ := f.client.CoreV1().Nodes().Get(context.Background(), testNodeName, metav1.GetOptions{})
	if node.Labels["kubernetes.io/hostname"] != testNodeName || node.Status.DaemonEndpoints.KubeletEndpoint.Port == 0 ||
		node.Status.Allocatable.Cpu().String() != "2" || node.Status.NodeInfo.KubeletVersion != kubeletVersion {
		t.Errorf("node object: labels %v, endpoint %d, allocatable %v", node.Labels, node.Status.DaemonEndpoints.KubeletEndpoint.Port, node.Status.Allocatable)
	}
	waitFor(t, statusTimeout, "node lease", func() bool {
		l, err := f.client.CoordinationV1().Leases(leaseNamespace).Get(context.Background(), testNodeName, metav1.GetOptions{})
		return err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == testNodeName
	})

	t.Run("failure with FallbackToLogsOnError and logs endpoint", func(t *testing.T) {
		t.Parallel()
		pod := shellPod("fails", "echo starting; echo boom >&2; exit 3")
		pod.Spec.Containers[0].TerminationMessagePolicy = corev1.TerminationMessageFallbackToLogsOnError
		f.createPod(pod)
		p := f.waitPod("fails", "Failed", phaseIs(corev1.PodFailed))
		cs := p.Status.ContainerStatuses[0]
		term := cs.State.Terminated
		if term == nil || term.ExitCode != 3 || term.Reason != "Error" || term.Message != "starting\nboom\n" {
			t.Fatalf("status: %s", statusSummary(p))
		}
		if !strings.HasPrefix(cs.ContainerID, "local-process://uid-fails/main/0") || cs.ImageID != "local://"+shellImage {
			t.Errorf("ids: %q %q", cs.ContainerID, cs.ImageID)
		}
		if p.Status.PodIP != nodeIP || p.Status.HostIP != nodeIP || p.Status.StartTime == nil {
			t.Errorf("ips/startTime: %+v", p.Status)
		}
		if condition(p, corev1.PodReady) != corev1.ConditionFalse || condition(p, corev1.PodInitialized) != corev1.ConditionTrue {
			t.Errorf("conditions: %+v", p.Status.Conditions)
		}
		body := f.getLogs(t, "fails", "main", "")
		if body != "starting\nboom\n" {
			t.Errorf("logs = %q", body)
		}
		if body := f.getLogs(t, "fails", "main", "tailLines=1"); body != "boom\n" {
			t.Errorf("tailLines=1 logs = %q", body)
		}
	})

	t.Run("success with termination message file", func(t *testing.T) {
		t.Parallel()
		pod := shellPod("succeeds", "echo -n 'all good' > /dev/termination-log; echo out")
		f.createPod(pod)
		p := f.waitPod("succeeds", "Succeeded", phaseIs(corev1.PodSucceeded))
		term := p.Status.ContainerStatuses[0].State.Terminated
		if term == nil || term.ExitCode != 0 || term.Reason != "Completed" || term.Message != "all good" {
			t.Fatalf("status: %s", statusSummary(p))
		}
		if r := condition(p, corev1.PodReady); r != corev1.ConditionFalse {
			t.Errorf("Ready = %s", r)
		}
		// Status is written when it changes, not on every sync.
		time.Sleep(3 * time.Second)
		if n := f.statusUpdates("succeeds"); n > 4 {
			t.Errorf("%d status updates for a pod that ran once", n)
		}
	})

	t.Run("OnFailure restarts in place with emptyDir kept", func(t *testing.T) {
		t.Parallel()
		pod := shellPod("onfailure", `n=$(cat /data/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /data/count; echo run $n; [ $n -ge 3 ]`)
		pod.Spec.RestartPolicy = corev1.RestartPolicyOnFailure
		pod.Spec.Volumes = []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
		pod.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "data", MountPath: "/tmp/nodeagent-test-data"}}
		pod.Spec.Containers[0].Args = []string{strings.ReplaceAll(pod.Spec.Containers[0].Args[0], "/data", "/tmp/nodeagent-test-data")}
		f.createPod(pod)
		sawRunningAfterCrash := false
		p := f.waitPod("onfailure", "Succeeded", func(p *corev1.Pod) bool {
			if p.Status.Phase == corev1.PodRunning && len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].RestartCount > 0 {
				sawRunningAfterCrash = true
			}
			return p.Status.Phase == corev1.PodSucceeded
		})
		cs := p.Status.ContainerStatuses[0]
		if cs.RestartCount != 2 || cs.LastTerminationState.Terminated == nil || cs.LastTerminationState.Terminated.ExitCode != 1 ||
			cs.State.Terminated == nil || cs.State.Terminated.ExitCode != 0 || !strings.HasSuffix(cs.ContainerID, "/2") {
			t.Fatalf("status: %s (id %s)", statusSummary(p), cs.ContainerID)
		}
		if !sawRunningAfterCrash {
			t.Log("note: phase Running between restarts was not observed (timing)")
		}
		if body := f.getLogs(t, "onfailure", "main", ""); body != "run 1\nrun 2\nrun 3\n" {
			t.Errorf("logs = %q", body)
		}
	})

	t.Run("missing secret then created", func(t *testing.T) {
		t.Parallel()
		pod := shellPod("needs-secret", `echo "password=$PASSWORD"`)
		pod.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "PASSWORD", ValueFrom: &corev1.EnvVarSource{
			SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "later"}, Key: "pw"}}}}
		f.createPod(pod)
		p := f.waitPod("needs-secret", "CreateContainerConfigError", func(p *corev1.Pod) bool {
			return len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].State.Waiting != nil &&
				p.Status.ContainerStatuses[0].State.Waiting.Reason == "CreateContainerConfigError"
		})
		if msg := p.Status.ContainerStatuses[0].State.Waiting.Message; msg != `secret "later" not found` || p.Status.Phase != corev1.PodPending {
			t.Fatalf("status: %s", statusSummary(p))
		}
		_, err := f.client.CoreV1().Secrets(testNS).Create(context.Background(), &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: "later", Namespace: testNS}, Data: map[string][]byte{"pw": []byte("hunter2")}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		f.waitPod("needs-secret", "Succeeded", phaseIs(corev1.PodSucceeded))
		if body := f.getLogs(t, "needs-secret", "main", ""); body != "password=hunter2\n" {
			t.Errorf("logs = %q", body)
		}
	})

	t.Run("image not in the map", func(t *testing.T) {
		t.Parallel()
		pod := shellPod("no-image", "true")
		pod.Spec.Containers[0].Image = missingImage
		f.createPod(pod)
		p := f.waitPod("no-image", "ErrImagePull", func(p *corev1.Pod) bool {
			return len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].State.Waiting != nil &&
				p.Status.ContainerStatuses[0].State.Waiting.Reason == "ErrImagePull"
		})
		want := fmt.Sprintf("local node agent: image %q is not in the image map (%s)", missingImage, f.agent.images.describe())
		if msg := p.Status.ContainerStatuses[0].State.Waiting.Message; msg != want {
			t.Errorf("message %q, want %q", msg, want)
		}
		p = f.waitPod("no-image", "ImagePullBackOff", func(p *corev1.Pod) bool {
			return p.Status.ContainerStatuses[0].State.Waiting != nil && p.Status.ContainerStatuses[0].State.Waiting.Reason == "ImagePullBackOff"
		})
		if msg := p.Status.ContainerStatuses[0].State.Waiting.Message; msg != fmt.Sprintf("Back-off pulling image %q", missingImage) || p.Status.Phase != corev1.PodPending {
			t.Errorf("status: %s", statusSummary(p))
		}
	})

	t.Run("graceful deletion", func(t *testing.T) {
		t.Parallel()
		pod := helperPod("deleted", "term-trap")
		pod.Spec.RestartPolicy = corev1.RestartPolicyAlways
		f.createPod(pod)
		p := f.waitPod("deleted", "Ready", func(p *corev1.Pod) bool { return condition(p, corev1.PodReady) == corev1.ConditionTrue })
		if p.Status.Phase != corev1.PodRunning {
			t.Fatalf("status: %s", statusSummary(p))
		}
		// Running is not "has installed its SIGTERM handler": wait for it.
		waitFor(t, statusTimeout, "handler installed", func() bool {
			return f.getLogs(t, "deleted", "main", "") == "waiting for SIGTERM\n"
		})
		// What the API server does on a graceful delete.
		now := metav1.Now()
		grace := int64(10)
		p.DeletionTimestamp, p.DeletionGracePeriodSeconds = &now, &grace
		if _, err := f.client.CoreV1().Pods(testNS).Update(context.Background(), p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, statusTimeout, "pod removed by the agent", func() bool { return f.getPod("deleted") == nil })
		logPath := f.agent.logPath(p, "main")
		waitFor(t, 5*time.Second, "pod directory removed", func() bool {
			_, err := os.Stat(f.agent.podDir(p.UID))
			return os.IsNotExist(err)
		})
		data, _ := os.ReadFile(logPath)
		if string(data) != "waiting for SIGTERM\ngot SIGTERM\n" {
			t.Errorf("log after deletion = %q", data)
		}
		// The final status before the delete: terminated with exit 0.
		var final *corev1.Pod
		for _, a := range f.client.Actions() {
			if u, ok := a.(k8stesting.UpdateAction); ok && a.GetSubresource() == "status" {
				if up, ok := u.GetObject().(*corev1.Pod); ok && up.Name == "deleted" {
					final = up
				}
			}
		}
		if final == nil || final.Status.Phase != corev1.PodSucceeded || final.Status.ContainerStatuses[0].State.Terminated == nil {
			t.Errorf("final status before deletion: %v", final)
		}
	})

	t.Run("force deletion kills the process", func(t *testing.T) {
		t.Parallel()
		pod := helperPod("forced", "sleep")
		f.createPod(pod)
		p := f.waitPod("forced", "Running", phaseIs(corev1.PodRunning))
		pid := f.containerPid(p, "main")
		zero := int64(0)
		if err := f.client.CoreV1().Pods(testNS).Delete(context.Background(), "forced", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, statusTimeout, "process killed", func() bool { return !processAlive(pid) })
	})

	t.Run("activeDeadlineSeconds", func(t *testing.T) {
		t.Parallel()
		pod := helperPod("deadline", "sleep")
		ads := int64(2)
		pod.Spec.ActiveDeadlineSeconds = &ads
		f.createPod(pod)
		p := f.waitPod("deadline", "Failed", phaseIs(corev1.PodFailed))
		term := p.Status.ContainerStatuses[0].State.Terminated
		if p.Status.Reason != "DeadlineExceeded" || p.Status.Message != "Pod was active on the node longer than the specified deadline" ||
			term == nil || term.ExitCode != 143 || term.Signal != int32(syscall.SIGTERM) {
			t.Fatalf("status: %s", statusSummary(p))
		}
	})

	t.Run("memory limit OOMKilled", func(t *testing.T) {
		t.Parallel()
		if !f.agent.cgroups.available {
			t.Skip("no cgroup v1 memory")
		}
		pod := helperPod("oom", "alloc")
		pod.Spec.Containers[0].Resources.Limits = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")}
		f.createPod(pod)
		p := f.waitPod("oom", "Failed", phaseIs(corev1.PodFailed))
		term := p.Status.ContainerStatuses[0].State.Terminated
		if term == nil || term.Reason != "OOMKilled" || term.ExitCode != 137 {
			t.Fatalf("status: %s", statusSummary(p))
		}
	})

	t.Run("init container, volumes, security context", func(t *testing.T) {
		t.Parallel()
		yes, no := true, false
		uid := int64(65532)
		mode := int32(0o444)
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "full", Labels: map[string]string{"app": "full"}},
			Spec: corev1.PodSpec{
				ServiceAccountName: "runner",
				SecurityContext:    &corev1.PodSecurityContext{RunAsUser: &uid, RunAsNonRoot: &yes},
				InitContainers: []corev1.Container{{
					Name: "prepare", Image: shellImage, Args: []string{"echo prepared > /tmp/nodeagent-full/work/ready"},
					VolumeMounts: []corev1.VolumeMount{{Name: "work", MountPath: "/tmp/nodeagent-full/work"}},
				}},
				Containers: []corev1.Container{{
					Name: "main", Image: shellImage,
					Args: []string{`set -e
cat /tmp/nodeagent-full/work/ready
cat /tmp/nodeagent-full/sa/token; echo
cat /tmp/nodeagent-full/sa/namespace; echo
cat /tmp/nodeagent-full/cfg/greeting; echo
cat /tmp/nodeagent-full/info/labels; echo
id -u
if touch /tmp/nodeagent-full-rootfs-probe 2>/dev/null; then echo root-writable; else echo root-readonly; fi
echo written > /tmp/nodeagent-full/work/out && echo volume-writable`},
					SecurityContext: &corev1.SecurityContext{ReadOnlyRootFilesystem: &yes, AllowPrivilegeEscalation: &no},
					VolumeMounts: []corev1.VolumeMount{
						{Name: "work", MountPath: "/tmp/nodeagent-full/work"},
						{Name: "sa", MountPath: "/tmp/nodeagent-full/sa"},
						{Name: "cfg", MountPath: "/tmp/nodeagent-full/cfg"},
						{Name: "info", MountPath: "/tmp/nodeagent-full/info"},
					},
				}},
				Volumes: []corev1.Volume{
					{Name: "work", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
					{Name: "sa", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
						{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token"}},
						{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{{Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}}}},
					}}}},
					{Name: "cfg", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
						LocalObjectReference: corev1.LocalObjectReference{Name: "greetings"}, DefaultMode: &mode}}},
					{Name: "info", VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{Items: []corev1.DownwardAPIVolumeFile{
						{Path: "labels", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}}}}}},
				},
			},
		}
		f.createPod(pod)
		// The ConfigMap does not exist yet: ContainerCreating.
		p := f.waitPod("full", "ContainerCreating", func(p *corev1.Pod) bool {
			return len(p.Status.InitContainerStatuses) == 1 && p.Status.InitContainerStatuses[0].State.Waiting != nil &&
				strings.Contains(p.Status.InitContainerStatuses[0].State.Waiting.Message, `configmap "greetings" not found`)
		})
		if p.Status.Phase != corev1.PodPending || p.Status.InitContainerStatuses[0].State.Waiting.Reason != "ContainerCreating" ||
			p.Status.ContainerStatuses[0].State.Waiting.Reason != "PodInitializing" || condition(p, corev1.PodInitialized) != corev1.ConditionFalse {
			t.Fatalf("status: %s", statusSummary(p))
		}
		if _, err := f.client.CoreV1().ConfigMaps(testNS).Create(context.Background(), &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: "greetings", Namespace: testNS}, Data: map[string]string{"greeting": "hello"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		p = f.waitPod("full", "Succeeded", func(p *corev1.Pod) bool { return isTerminalPhase(p.Status.Phase) })
		if p.Status.Phase != corev1.PodSucceeded {
			t.Fatalf("status: %s", statusSummary(p))
		}
		body := f.getLogs(t, "full", "main", "")
		want := "prepared\ntoken-for-Pod/full\ndefault\nhello\napp=\"full\"\n65532\nroot-readonly\nvolume-writable\n"
		if p.Status.Phase != corev1.PodSucceeded || body != want {
			t.Fatalf("status: %s\nlogs: %q\nwant: %q", statusSummary(p), body, want)
		}
		if !p.Status.InitContainerStatuses[0].Ready || p.Status.InitContainerStatuses[0].State.Terminated.Reason != "Completed" {
			t.Errorf("init status: %s", statusSummary(p))
		}
	})
}

// TestAgentAdoptsPodsOfAnEarlierRun checks the agent-restart case: the API
// says a container runs, no process of this agent does.
func TestAgentAdoptsPodsOfAnEarlierRun(t *testing.T) {
	requireRoot(t)
	started := metav1.NewTime(time.Now().Add(-time.Minute).Truncate(time.Second))
	running := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "orphaned", Namespace: testNS, UID: "uid-orphaned"},
		Spec: corev1.PodSpec{NodeName: testNodeName, RestartPolicy: corev1.RestartPolicyNever,
			Containers: []corev1.Container{{Name: "main", Image: shellImage, Args: []string{"sleep 100"}}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, StartTime: &started, ContainerStatuses: []corev1.ContainerStatus{{
			Name: "main", Image: shellImage, ContainerID: "local-process://uid-orphaned/main/0",
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}}}}},
	}
	done := running.DeepCopy()
	done.Name, done.UID = "finished", "uid-finished"
	done.Status.Phase = corev1.PodSucceeded
	done.Status.ContainerStatuses[0].State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed"}}

	f := startAgent(t)
	for _, p := range []*corev1.Pod{running, done} {
		if _, err := f.client.CoreV1().Pods(testNS).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	p := f.waitPod("orphaned", "Failed", phaseIs(corev1.PodFailed))
	term := p.Status.ContainerStatuses[0].State.Terminated
	if term == nil || term.ExitCode != 137 || term.Reason != reasonContainerStatusUnknown || term.Message != messageContainerNotLocated {
		t.Fatalf("status: %s", statusSummary(p))
	}
	time.Sleep(time.Second)
	if got := f.getPod("finished"); got.Status.Phase != corev1.PodSucceeded || got.Status.ContainerStatuses[0].State.Terminated.Reason != "Completed" {
		t.Fatalf("finished pod changed: %s", statusSummary(got))
	}
	if _, err := os.Stat(filepath.Join(f.agent.rootDir, "logs", "default_finished_uid-finished")); err == nil {
		t.Fatal("a finished pod was started again")
	}
}

func (f *agentFixture) getLogs(t *testing.T, pod, container, query string) string {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, Timeout: 10 * time.Second}
	url := fmt.Sprintf("https://127.0.0.1:%d/containerLogs/%s/%s/%s?%s", f.agent.kubeletPort, testNS, pod, container, query)
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, body)
	}
	return string(body)
}

// statusUpdates counts the pods/status updates sent for a pod.
func (f *agentFixture) statusUpdates(name string) int {
	n := 0
	for _, a := range f.client.Actions() {
		if u, ok := a.(k8stesting.UpdateAction); ok && a.GetSubresource() == "status" {
			if p, ok := u.GetObject().(*corev1.Pod); ok && p.Name == name {
				n++
			}
		}
	}
	return n
}

// containerPid reads the pid the agent recorded for a running container.
func (f *agentFixture) containerPid(p *corev1.Pod, container string) int {
	f.t.Helper()
	files, _ := filepath.Glob(filepath.Join(f.agent.podDir(p.UID), "run", container+"-*.pid"))
	if len(files) == 0 {
		f.t.Fatal("no pid file")
	}
	var pid int
	raw, _ := os.ReadFile(files[0])
	fmt.Sscanf(string(raw), "%d", &pid)
	return pid
}

func processAlive(pid int) bool {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && len(s) > i+2 && s[i+2] != 'Z'
}
