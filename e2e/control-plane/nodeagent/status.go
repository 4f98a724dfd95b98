package nodeagent

// Pod status as the kubelet reports it: the phase derived from container
// states, the node-owned conditions, container statuses sorted by name,
// written through the pods/status subresource and only when it changed.

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// containerStatus renders one record.
func (w *podWorker) containerStatus(pod *corev1.Pod, rec *containerRecord) corev1.ContainerStatus {
	c := findContainer(pod, rec.name)
	st := corev1.ContainerStatus{Name: rec.name, RestartCount: rec.restartCount}
	if c != nil {
		st.Image = c.Image
	}
	started := false
	switch {
	case rec.run != nil:
		st.State.Running = &corev1.ContainerStateRunning{StartedAt: apiTime(rec.run.startedAt)}
		st.ContainerID = rec.run.id
		started = rec.run.probes.isStarted()
		st.Ready = started && rec.run.probes.isReady()
		if rec.kind == kindInit {
			st.Ready = false
		}
		if rec.lastTerminated != nil {
			st.LastTerminationState.Terminated = rec.lastTerminated.DeepCopy()
		}
	case rec.waiting != nil:
		st.State.Waiting = rec.waiting.DeepCopy()
		last := rec.lastTerminated
		if rec.terminated != nil {
			last = rec.terminated // waiting to restart it
		}
		if last != nil {
			st.LastTerminationState.Terminated = last.DeepCopy()
		}
	case rec.terminated != nil:
		st.State.Terminated = rec.terminated.DeepCopy()
		st.ContainerID = rec.terminated.ContainerID
		// A completed init container counts as ready, as the kubelet has it.
		st.Ready = rec.kind == kindInit && rec.terminated.ExitCode == 0
		if rec.lastTerminated != nil {
			st.LastTerminationState.Terminated = rec.lastTerminated.DeepCopy()
		}
	default:
		reason := "ContainerCreating"
		if rec.kind == kindRegular && !w.initDone() {
			reason = "PodInitializing"
		}
		st.State.Waiting = &corev1.ContainerStateWaiting{Reason: reason}
		if w.volumeErr != nil {
			st.State.Waiting.Message = w.volumeErr.Error()
		}
		if rec.lastTerminated != nil {
			st.LastTerminationState.Terminated = rec.lastTerminated.DeepCopy()
		}
	}
	if st.ContainerID != "" && c != nil {
		st.ImageID = "local://" + c.Image
	}
	st.Started = &started
	return st
}

// initDone reports whether the pod's init containers let the regular
// containers start: every init container completed, every sidecar started.
func (w *podWorker) initDone() bool {
	for _, rec := range w.records {
		switch rec.kind {
		case kindInit:
			if rec.terminated == nil || rec.terminated.ExitCode != 0 || rec.run != nil {
				return false
			}
		case kindSidecar:
			if rec.run == nil && rec.terminated == nil {
				return false
			}
		}
	}
	return true
}

// phase derives the pod phase from container states, as the kubelet does.
func (w *podWorker) phase(pod *corev1.Pod) corev1.PodPhase {
	if !w.initDone() {
		if w.terminal {
			return corev1.PodFailed
		}
		for _, rec := range w.records {
			if rec.kind == kindInit && rec.run == nil && rec.terminated != nil && rec.terminated.ExitCode != 0 && !w.shouldRestart(pod, rec) {
				return corev1.PodFailed // an init container failed with restartPolicy Never
			}
		}
		return corev1.PodPending
	}
	var total, running, waiting, stopped, succeeded int
	for _, rec := range w.records {
		if rec.kind != kindRegular {
			continue
		}
		total++
		switch {
		case rec.run != nil:
			running++
		case rec.terminated != nil:
			stopped++
			if rec.terminated.ExitCode == 0 {
				succeeded++
			}
		default:
			waiting++
		}
	}
	if w.reason == "DeadlineExceeded" {
		return corev1.PodFailed
	}
	switch {
	case w.terminal && running == 0:
		if succeeded == total {
			return corev1.PodSucceeded
		}
		return corev1.PodFailed
	case waiting > 0:
		return corev1.PodPending
	case running > 0:
		return corev1.PodRunning
	case stopped > 0:
		pendingRestart := false
		for _, rec := range w.records {
			if rec.kind == kindRegular && rec.terminated != nil && w.shouldRestart(pod, rec) {
				pendingRestart = true
			}
		}
		if pendingRestart {
			return corev1.PodRunning // crashed and about to be restarted
		}
		if succeeded == stopped {
			return corev1.PodSucceeded
		}
		return corev1.PodFailed
	}
	return corev1.PodPending
}

// buildStatus is the pod's status as the node sees it, merged into the
// API's status so that fields owned by others (PodScheduled, conditions of
// controllers, qosClass) are kept.
func (w *podWorker) buildStatus(pod *corev1.Pod) corev1.PodStatus {
	st := *pod.Status.DeepCopy()
	phase := w.phase(pod)
	if isTerminalPhase(pod.Status.Phase) {
		phase = pod.Status.Phase // never leave a terminal phase
	}
	st.Phase = phase
	if w.reason != "" {
		st.Reason, st.Message = w.reason, w.message
	}
	st.HostIP, st.PodIP = nodeIP, nodeIP
	st.HostIPs = []corev1.HostIP{{IP: nodeIP}}
	st.PodIPs = []corev1.PodIP{{IP: nodeIP}}
	if st.StartTime == nil && !w.startTime.IsZero() {
		t := apiTime(w.startTime)
		st.StartTime = &t
	}
	st.ObservedGeneration = pod.Generation

	st.InitContainerStatuses, st.ContainerStatuses = nil, nil
	for _, rec := range w.records {
		cs := w.containerStatus(pod, rec)
		if rec.kind == kindRegular {
			st.ContainerStatuses = append(st.ContainerStatuses, cs)
		} else {
			st.InitContainerStatuses = append(st.InitContainerStatuses, cs)
		}
	}
	sort.Slice(st.ContainerStatuses, func(i, j int) bool { return st.ContainerStatuses[i].Name < st.ContainerStatuses[j].Name })

	// Transition times compare with what the node last said, not with a
	// possibly older informer copy, so they do not move on every sync.
	prev := pod.Status.Conditions
	if w.lastSent != nil {
		prev = w.lastSent.Conditions
	}
	terminal := isTerminalPhase(phase)
	sandbox := w.volumes != nil && !terminal
	setCondition(&st, prev, pod.Generation, corev1.PodReadyToStartContainers, sandbox, "", "")

	initialized, initReason, initMsg := true, "", ""
	if !w.initDone() {
		var names []string
		for _, rec := range w.records {
			if rec.kind == kindInit && (rec.terminated == nil || rec.terminated.ExitCode != 0 || rec.run != nil) ||
				rec.kind == kindSidecar && rec.run == nil && rec.terminated == nil {
				names = append(names, rec.name)
			}
		}
		initialized, initReason, initMsg = false, "ContainersNotInitialized", fmt.Sprintf("containers with incomplete status: [%s]", strings.Join(names, " "))
	}
	setCondition(&st, prev, pod.Generation, corev1.PodInitialized, initialized, initReason, initMsg)

	var unready []string
	for _, cs := range append(append([]corev1.ContainerStatus{}, st.InitContainerStatuses...), st.ContainerStatuses...) {
		rec := w.record(cs.Name)
		if rec == nil || rec.kind == kindInit {
			continue
		}
		if !cs.Ready {
			unready = append(unready, cs.Name)
		}
	}
	ready, reason, msg := len(unready) == 0 && !terminal, "", ""
	switch {
	case phase == corev1.PodSucceeded:
		ready, reason = false, "PodCompleted"
	case !ready:
		reason, msg = "ContainersNotReady", fmt.Sprintf("containers with unready status: [%s]", strings.Join(unready, " "))
	}
	setCondition(&st, prev, pod.Generation, corev1.ContainersReady, ready, reason, msg)
	if ready {
		if gateMsg := readinessGatesMessage(pod); gateMsg != "" {
			ready, reason, msg = false, "ReadinessGatesNotReady", gateMsg
		}
	}
	setCondition(&st, prev, pod.Generation, corev1.PodReady, ready, reason, msg)
	return st
}

func (w *podWorker) record(name string) *containerRecord {
	for _, rec := range w.records {
		if rec.name == name {
			return rec
		}
	}
	return nil
}

// readinessGatesMessage explains the first readiness gate that does not
// hold, "" when all do.
func readinessGatesMessage(pod *corev1.Pod) string {
	for _, gate := range pod.Spec.ReadinessGates {
		found := false
		for _, c := range pod.Status.Conditions {
			if c.Type == gate.ConditionType {
				found = true
				if c.Status != corev1.ConditionTrue {
					return fmt.Sprintf("the status of pod readiness gate %q is not \"True\", but %v", gate.ConditionType, c.Status)
				}
			}
		}
		if !found {
			return fmt.Sprintf("corresponding condition of pod readiness gate %q does not exist.", gate.ConditionType)
		}
	}
	return ""
}

// setCondition upserts a node-owned condition, keeping its transition time
// unless its status changed.
func setCondition(st *corev1.PodStatus, prev []corev1.PodCondition, generation int64, t corev1.PodConditionType, ok bool, reason, message string) {
	status := corev1.ConditionFalse
	if ok {
		status = corev1.ConditionTrue
	}
	c := corev1.PodCondition{Type: t, Status: status, Reason: reason, Message: message, ObservedGeneration: generation, LastTransitionTime: apiTime(time.Now())}
	for _, p := range prev {
		if p.Type == t && p.Status == status {
			c.LastTransitionTime = p.LastTransitionTime
		}
	}
	for i := range st.Conditions {
		if st.Conditions[i].Type == t {
			st.Conditions[i] = c
			return
		}
	}
	st.Conditions = append(st.Conditions, c)
}

// report sends the pod's status if it differs from what the API has and
// from what was sent last. A conflict means the informer copy is stale:
// the status is rebuilt on a fresh GET and sent again.
func (w *podWorker) report(ctx context.Context, pod *corev1.Pod) {
	status := w.buildStatus(pod)
	if w.lastSent != nil && apiequality.Semantic.DeepEqual(status, *w.lastSent) {
		return
	}
	if apiequality.Semantic.DeepEqual(status, pod.Status) {
		w.lastSent = &status
		return
	}
	for attempt := 0; attempt < 5; attempt++ {
		obj := pod.DeepCopy()
		obj.Status = status
		callCtx, cancel := w.agent.callContext(ctx)
		_, err := w.agent.client.CoreV1().Pods(pod.Namespace).UpdateStatus(callCtx, obj, metav1.UpdateOptions{})
		cancel()
		if err == nil {
			sent := status
			w.lastSent = &sent
			if status.Phase != w.lastPhase {
				w.logger.Info("pod phase changed", "from", string(w.lastPhase), "phase", string(status.Phase), "reason", status.Reason)
				w.lastPhase = status.Phase
			}
			return
		}
		if apierrors.IsNotFound(err) {
			return // gone; the informer will say so
		}
		if !apierrors.IsConflict(err) {
			w.logger.Warn("updating pod status failed; will retry", "err", err)
			return
		}
		callCtx, cancel = w.agent.callContext(ctx)
		fresh, gerr := w.agent.client.CoreV1().Pods(pod.Namespace).Get(callCtx, pod.Name, metav1.GetOptions{})
		cancel()
		if gerr != nil || fresh.UID != pod.UID {
			return
		}
		pod = fresh
		status = w.buildStatus(pod)
	}
}
