package nodeagent

// The Node object and its heartbeats. The node lifecycle controller of
// kube-controller-manager watches the node's Lease (and, less often, its
// Ready condition); as long as both are renewed it keeps the node Ready and
// untainted, so the scheduler places pods on it.

import (
	"context"
	"os"
	"runtime"
	"strings"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	nodeIP                  = "127.0.0.1"
	kubeletVersion          = "v1.37.2"
	containerRuntimeVersion = "local-process://1"
	leaseNamespace          = "kube-node-lease"
	leaseDurationSeconds    = 40
	leaseRenewInterval      = 10 * time.Second
	nodeStatusInterval      = 40 * time.Second
)

// nodeLabels are the labels a kubelet puts on its Node.
func (a *Agent) nodeLabels() map[string]string {
	return map[string]string{
		"kubernetes.io/hostname":           a.nodeName,
		"kubernetes.io/os":                 "linux",
		"kubernetes.io/arch":               runtime.GOARCH,
		"node.kubernetes.io/instance-type": "local",
	}
}

// registerNode creates the Node or brings an existing one up to date, and
// clears the not-ready taints a new node is admitted with. It retries until
// it works or ctx ends: the API server may still be starting.
func (a *Agent) registerNode(ctx context.Context) error {
	for {
		err := a.tryRegisterNode(ctx)
		if err == nil {
			a.logger.Info("node registered", "node", a.nodeName, "kubeletPort", a.kubeletPort)
			return nil
		}
		a.logger.Warn("registering node failed; retrying", "node", a.nodeName, "err", err)
		if !sleepCtx(ctx, 2*time.Second) {
			return ctx.Err()
		}
	}
}

func (a *Agent) tryRegisterNode(ctx context.Context) error {
	nodes := a.client.CoreV1().Nodes()
	callCtx, cancel := a.callContext(ctx)
	node, err := nodes.Get(callCtx, a.nodeName, metav1.GetOptions{})
	cancel()
	if apierrors.IsNotFound(err) {
		node = &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: a.nodeName, Labels: a.nodeLabels()}}
		a.fillNodeStatus(node)
		callCtx, cancel := a.callContext(ctx)
		node, err = nodes.Create(callCtx, node, metav1.CreateOptions{})
		cancel()
	}
	if err != nil {
		return err
	}
	changed := false
	if node.Labels == nil {
		node.Labels = map[string]string{}
	}
	for k, v := range a.nodeLabels() {
		if node.Labels[k] != v {
			node.Labels[k], changed = v, true
		}
	}
	// The TaintNodesByCondition admission plugin gives a new node the
	// not-ready taint; a node that was down may carry unreachable. The
	// agent is alive and ready now.
	var taints []corev1.Taint
	for _, t := range node.Spec.Taints {
		if t.Key == "node.kubernetes.io/not-ready" || t.Key == "node.kubernetes.io/unreachable" {
			changed = true
			continue
		}
		taints = append(taints, t)
	}
	node.Spec.Taints = taints
	if node.Spec.Unschedulable {
		a.logger.Info("node is cordoned (spec.unschedulable); leaving it so")
	}
	if changed {
		callCtx, cancel := a.callContext(ctx)
		node, err = nodes.Update(callCtx, node, metav1.UpdateOptions{})
		cancel()
		if err != nil {
			return err
		}
	}
	return a.updateNodeStatus(ctx, node)
}

// updateNodeStatus writes the node's status (capacity, addresses, node
// info, conditions with a fresh heartbeat) onto node and sends it, retrying
// once on a conflict.
func (a *Agent) updateNodeStatus(ctx context.Context, node *corev1.Node) error {
	nodes := a.client.CoreV1().Nodes()
	for attempt := 0; ; attempt++ {
		a.fillNodeStatus(node)
		callCtx, cancel := a.callContext(ctx)
		_, err := nodes.UpdateStatus(callCtx, node, metav1.UpdateOptions{})
		cancel()
		if err == nil || !apierrors.IsConflict(err) || attempt == 2 {
			return err
		}
		callCtx, cancel = a.callContext(ctx)
		node, err = nodes.Get(callCtx, a.nodeName, metav1.GetOptions{})
		cancel()
		if err != nil {
			return err
		}
	}
}

// fillNodeStatus sets the node-owned parts of node.Status.
func (a *Agent) fillNodeStatus(node *corev1.Node) {
	s := &node.Status
	s.Capacity = a.capacity.DeepCopy()
	s.Allocatable = a.allocatable.DeepCopy()
	s.Phase = ""
	s.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: nodeIP},
		{Type: corev1.NodeHostName, Address: a.nodeName},
	}
	s.DaemonEndpoints.KubeletEndpoint.Port = int32(a.kubeletPort)
	s.NodeInfo = corev1.NodeSystemInfo{
		MachineID:               readTrimmed("/etc/machine-id"),
		SystemUUID:              readTrimmed("/sys/class/dmi/id/product_uuid"),
		BootID:                  readTrimmed("/proc/sys/kernel/random/boot_id"),
		KernelVersion:           kernelVersion(),
		OSImage:                 osImage(),
		ContainerRuntimeVersion: containerRuntimeVersion,
		KubeletVersion:          kubeletVersion,
		OperatingSystem:         "linux",
		Architecture:            runtime.GOARCH,
	}
	now := metav1.Now()
	want := []corev1.NodeCondition{
		{Type: corev1.NodeMemoryPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientMemory", Message: "kubelet has sufficient memory available"},
		{Type: corev1.NodeDiskPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasNoDiskPressure", Message: "kubelet has no disk pressure"},
		{Type: corev1.NodePIDPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientPID", Message: "kubelet has sufficient PID available"},
		{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", Message: "kubelet is posting ready status"},
	}
	for _, c := range want {
		c.LastHeartbeatTime = now
		c.LastTransitionTime = now
		found := false
		for i := range s.Conditions {
			if s.Conditions[i].Type != c.Type {
				continue
			}
			found = true
			if s.Conditions[i].Status == c.Status {
				c.LastTransitionTime = s.Conditions[i].LastTransitionTime
			}
			s.Conditions[i] = c
		}
		if !found {
			s.Conditions = append(s.Conditions, c)
		}
	}
}

// heartbeat renews the node Lease every 10 s and the node status every
// 40 s until ctx ends.
func (a *Agent) heartbeat(ctx context.Context) {
	leaseTick := time.NewTicker(leaseRenewInterval)
	defer leaseTick.Stop()
	statusTick := time.NewTicker(nodeStatusInterval)
	defer statusTick.Stop()
	a.renewLease(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-leaseTick.C:
			a.renewLease(ctx)
		case <-statusTick.C:
			callCtx, cancel := a.callContext(ctx)
			node, err := a.client.CoreV1().Nodes().Get(callCtx, a.nodeName, metav1.GetOptions{})
			cancel()
			if apierrors.IsNotFound(err) {
				// Someone deleted the Node: register again, as a kubelet does.
				err = a.tryRegisterNode(ctx)
			} else if err == nil {
				err = a.updateNodeStatus(ctx, node)
			}
			if err != nil && ctx.Err() == nil {
				a.logger.Warn("node status update failed", "err", err)
			}
		}
	}
}

// renewLease creates or renews the node's Lease in kube-node-lease, owned
// by the Node so it goes away with it.
func (a *Agent) renewLease(ctx context.Context) {
	leases := a.client.CoordinationV1().Leases(leaseNamespace)
	holder := a.nodeName
	duration := int32(leaseDurationSeconds)
	now := metav1.NewMicroTime(time.Now())
	callCtx, cancel := a.callContext(ctx)
	defer cancel()
	lease, err := leases.Get(callCtx, a.nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		lease = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: a.nodeName, Namespace: leaseNamespace},
			Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &duration, RenewTime: &now},
		}
		if node, err := a.client.CoreV1().Nodes().Get(callCtx, a.nodeName, metav1.GetOptions{}); err == nil {
			lease.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}}
		}
		_, err = leases.Create(callCtx, lease, metav1.CreateOptions{})
	} else if err == nil {
		lease.Spec.HolderIdentity, lease.Spec.LeaseDurationSeconds, lease.Spec.RenewTime = &holder, &duration, &now
		_, err = leases.Update(callCtx, lease, metav1.UpdateOptions{})
	}
	if err != nil && ctx.Err() == nil {
		a.logger.Warn("renewing node lease failed", "err", err)
	}
}

// nodeResources computes capacity (= allocatable: nothing is reserved for
// system daemons on a test node) from the flags, plus the free space of the
// root directory as ephemeral-storage so pods requesting some fit.
func nodeResources(cpu, memory, pods, rootDir string) (corev1.ResourceList, error) {
	list := corev1.ResourceList{}
	for name, v := range map[corev1.ResourceName]string{corev1.ResourceCPU: cpu, corev1.ResourceMemory: memory, corev1.ResourcePods: pods} {
		q, err := resource.ParseQuantity(v)
		if err != nil {
			return nil, err
		}
		list[name] = q
	}
	var fs syscall.Statfs_t
	if err := syscall.Statfs(rootDir, &fs); err == nil {
		list[corev1.ResourceEphemeralStorage] = *resource.NewQuantity(int64(fs.Bsize)*int64(fs.Blocks), resource.BinarySI)
	}
	return list, nil
}

func readTrimmed(path string) string {
	raw, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(raw))
}

func kernelVersion() string {
	return readTrimmed("/proc/sys/kernel/osrelease")
}

func osImage() string {
	raw, err := os.ReadFile("/etc/os-release")
	if err != nil {
		return "Linux"
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, "PRETTY_NAME="); ok {
			return strings.Trim(v, `"`)
		}
	}
	return "Linux"
}
