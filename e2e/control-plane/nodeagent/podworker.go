package nodeagent

// One pod worker per pod bound to the node: a goroutine that owns the
// pod's containers and status. It wakes up on informer events, process
// exits, probe changes and timers, and each time runs sync, which moves
// the pod one step along the kubelet's life cycle: set up volumes, run init
// containers in order, run the containers, restart them per policy, kill
// them on deletion or deadline, report status, finally delete the pod.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

const (
	// Restart back-off of crashed containers: the kubelet's shape (doubling,
	// reset after a long healthy run), shorter numbers so that Jobs with
	// restartPolicy OnFailure reach their backoffLimit in a test's time.
	crashBackoffInitial = 1 * time.Second
	crashBackoffMax     = 30 * time.Second
	crashBackoffReset   = 60 * time.Second
	// How long a missing image shows ErrImagePull before ImagePullBackOff.
	imagePullBackOffAfter = 5 * time.Second
	// How often a pod that waits on something outside the agent (a
	// Secret, an image, a volume) is retried.
	pendingRetry = 2 * time.Second
	// How often an otherwise quiet pod is synced anyway.
	idleResync = 10 * time.Second
	// Shortest grace period when killing, as the kubelet's minimum.
	minimumGrace = 2 * time.Second
	// How often a pod deletion that did not go through is retried.
	deleteRetry = 5 * time.Second

	reasonContainerStatusUnknown = "ContainerStatusUnknown"
	messageContainerNotLocated   = "The container could not be located when the pod was terminated"
)

type containerKind int

const (
	kindInit    containerKind = iota // runs to completion before the next
	kindSidecar                      // init container with restartPolicy Always
	kindRegular
)

// containerRecord is the agent's knowledge of one container of the pod.
// Exactly what the status shows is derived from it in status.go:
//   - run != nil: running (a process exists or exited moments ago);
//   - waiting != nil: waiting (not started yet, or back-off before a
//     restart of the run in terminated);
//   - terminated != nil: the last run's end.
type containerRecord struct {
	name string
	kind containerKind

	run            *containerRun
	waiting        *corev1.ContainerStateWaiting
	terminated     *corev1.ContainerStateTerminated
	lastTerminated *corev1.ContainerStateTerminated
	restartCount   int32

	backoff      time.Duration // next crash back-off
	waited       time.Duration // the back-off being waited now
	retryAt      time.Time     // no start before this
	imageMissing time.Time     // first failed "pull", zero if none
}

// podWorker drives one pod. Fields below mu are shared with the informer
// handlers; the rest belong to the worker goroutine alone.
type podWorker struct {
	agent  *Agent
	uid    types.UID
	logger *slog.Logger
	kick   chan struct{}

	mu   sync.Mutex
	pod  *corev1.Pod
	gone bool

	adopted    bool
	records    []*containerRecord
	volumes    *podVolumes
	volumeErr  error
	startTime  time.Time
	terminal   bool   // the pod finished on this node; nothing starts again
	reason     string // pod status reason/message set by the node
	message    string
	lastSent   *corev1.PodStatus
	lastPhase  corev1.PodPhase
	deletedAt  time.Time // last delete request
	deleted    bool      // the final delete went through
	nextWakeup time.Time
}

func newPodWorker(a *Agent, pod *corev1.Pod) *podWorker {
	return &podWorker{
		agent:  a,
		uid:    pod.UID,
		pod:    pod,
		logger: a.logger.With("pod", pod.Namespace+"/"+pod.Name, "uid", string(pod.UID)),
		kick:   make(chan struct{}, 1),
	}
}

// update hands the worker the newest version of its pod.
func (w *podWorker) update(pod *corev1.Pod) {
	w.mu.Lock()
	w.pod = pod
	w.mu.Unlock()
	w.poke()
}

// markGone tells the worker its pod no longer exists in the API; last is
// its final state when known (a force deletion's grace period is there).
func (w *podWorker) markGone(last *corev1.Pod) {
	w.mu.Lock()
	w.gone = true
	if last != nil && last.UID == w.uid {
		w.pod = last
	}
	w.mu.Unlock()
	w.poke()
}

// poke wakes the worker; it never blocks, one pending wake-up is enough.
func (w *podWorker) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

func (w *podWorker) snapshot() (*corev1.Pod, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pod, w.gone
}

// loop runs until the pod is gone (cleaning up after it) or the agent
// stops (stopping its containers but leaving its files for the next run).
func (w *podWorker) loop(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			w.shutdown()
			return
		case <-w.kick:
		case <-timer.C:
		}
		next, finished := w.sync(ctx)
		if finished {
			return
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(next)
	}
}

// sync is one step of the pod's life cycle. It returns when to run again
// at the latest, and whether the worker is done.
func (w *podWorker) sync(ctx context.Context) (time.Duration, bool) {
	pod, gone := w.snapshot()
	if gone {
		// Deleted by someone else (force deletion): kill what runs with
		// the grace period the deletion asked for.
		w.stopAll(w.graceOf(pod, pod.DeletionGracePeriodSeconds))
		w.collectExits(pod)
		w.cleanUp(pod)
		return 0, true
	}
	if !w.adopted {
		w.adopt(pod)
	}
	w.collectExits(pod)
	now := time.Now()

	switch {
	case isTerminalPhase(pod.Status.Phase) || w.terminal:
		// A finished pod is never restarted. Anything still running
		// (sidecars of a pod that just finished) is stopped.
		if w.anyRunning() {
			w.stopAll(w.graceOf(pod, nil))
			w.collectExits(pod)
		}
		w.markTerminal(pod)
		if !isTerminalPhase(pod.Status.Phase) {
			w.report(ctx, pod)
		}
		if pod.DeletionTimestamp != nil {
			w.finalDelete(ctx, pod)
			return deleteRetry, false
		}
		return idleResync, false
	case pod.DeletionTimestamp != nil:
		w.logger.Info("pod is being deleted: stopping containers", "grace", w.graceOf(pod, pod.DeletionGracePeriodSeconds))
		w.stopAll(w.graceOf(pod, pod.DeletionGracePeriodSeconds))
		w.collectExits(pod)
		w.markTerminal(pod)
		w.report(ctx, pod)
		w.finalDelete(ctx, pod)
		return deleteRetry, false
	case w.deadlineExceeded(pod, now):
		w.reason = "DeadlineExceeded"
		w.message = "Pod was active on the node longer than the specified deadline"
		w.logger.Info("pod exceeded activeDeadlineSeconds: stopping containers")
		w.stopAll(w.graceOf(pod, nil))
		w.collectExits(pod)
		w.markTerminal(pod)
		w.report(ctx, pod)
		return idleResync, false
	}

	w.nextWakeup = now.Add(idleResync)
	if w.volumes == nil {
		if err := w.setUpVolumes(ctx, pod); err != nil {
			w.report(ctx, pod)
			return pendingRetry, false
		}
	} else if !w.volumes.refreshAt.IsZero() && now.After(w.volumes.refreshAt) {
		// Rotate service-account tokens; on failure the old ones stay
		// and the rotation is tried again a little later.
		if err := w.setUpVolumes(ctx, pod); err != nil {
			w.logger.Warn("refreshing volumes failed", "err", err)
			w.volumes.refreshAt = now.Add(idleResync)
		}
	}
	if !w.volumes.refreshAt.IsZero() {
		w.wakeBy(w.volumes.refreshAt)
	}
	if pod.Spec.ActiveDeadlineSeconds != nil && !w.startTime.IsZero() {
		w.wakeBy(w.startTime.Add(time.Duration(*pod.Spec.ActiveDeadlineSeconds) * time.Second))
	}

	w.handleProbeKills(pod)
	w.advance(ctx, pod)
	if isTerminalPhase(w.phase(pod)) {
		// Regular containers are done for good: stop the sidecars, then
		// report the final status once.
		w.markTerminal(pod)
		if w.anyRunning() {
			w.stopAll(w.graceOf(pod, nil))
			w.collectExits(pod)
		}
	}
	w.report(ctx, pod)
	return time.Until(w.nextWakeup), false
}

// wakeBy makes the worker run again by t at the latest.
func (w *podWorker) wakeBy(t time.Time) {
	if t.Before(w.nextWakeup) {
		w.nextWakeup = t
	}
}

// adopt builds the container records, taking over what the API knows from
// an earlier life of the agent: restart counts and finished runs. A
// container the API shows running was started by a previous agent process
// and is gone now (the agent kills orphans on start), so it is reported as
// the kubelet reports a container it cannot find.
func (w *podWorker) adopt(pod *corev1.Pod) {
	w.adopted = true
	w.records = nil
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		kind := kindInit
		if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			kind = kindSidecar
		}
		w.records = append(w.records, &containerRecord{name: c.Name, kind: kind, backoff: crashBackoffInitial})
	}
	for i := range pod.Spec.Containers {
		w.records = append(w.records, &containerRecord{name: pod.Spec.Containers[i].Name, kind: kindRegular, backoff: crashBackoffInitial})
	}
	if pod.Status.StartTime != nil {
		w.startTime = pod.Status.StartTime.Time
	}
	w.lastPhase = pod.Status.Phase
	if isTerminalPhase(pod.Status.Phase) {
		w.terminal = true
		return
	}
	now := apiTime(time.Now())
	for _, rec := range w.records {
		st := findStatus(pod, rec.name)
		if st == nil {
			continue
		}
		rec.restartCount = st.RestartCount
		rec.lastTerminated = st.LastTerminationState.Terminated.DeepCopy()
		switch {
		case st.State.Running != nil:
			rec.terminated = &corev1.ContainerStateTerminated{
				ExitCode:    137,
				Reason:      reasonContainerStatusUnknown,
				Message:     messageContainerNotLocated,
				StartedAt:   st.State.Running.StartedAt,
				FinishedAt:  now,
				ContainerID: st.ContainerID,
			}
			w.logger.Info("container was running under an earlier agent and is gone", "container", rec.name)
		case st.State.Terminated != nil:
			rec.terminated = st.State.Terminated.DeepCopy()
		case st.State.Waiting != nil && st.LastTerminationState.Terminated != nil:
			// In back-off before a restart: the last run is the one to restart.
			rec.terminated, rec.lastTerminated = rec.lastTerminated, nil
		}
	}
}

// setUpVolumes (re)writes the pod's volumes; an error keeps the pod in
// ContainerCreating until a later sync succeeds.
func (w *podWorker) setUpVolumes(ctx context.Context, pod *corev1.Pod) error {
	if err := os.MkdirAll(w.agent.podDir(pod.UID), 0o755); err != nil {
		w.volumeErr = err
		return err
	}
	if w.startTime.IsZero() {
		// The kubelet sets startTime when it accepts the pod, before
		// volumes: activeDeadlineSeconds counts from here.
		w.startTime = time.Now()
	}
	vols, err := w.agent.volumes.setUp(ctx, pod, filepath.Join(w.agent.podDir(pod.UID), "volumes"))
	if err != nil {
		if w.volumeErr == nil || w.volumeErr.Error() != err.Error() {
			w.logger.Info("volumes not ready", "err", err)
		}
		w.volumeErr = err
		return err
	}
	w.volumes, w.volumeErr = vols, nil
	return nil
}

// advance starts what should run now: init containers one at a time (a
// sidecar counts as done once started), then all regular containers, each
// restarted per its restart policy.
func (w *podWorker) advance(ctx context.Context, pod *corev1.Pod) {
	for _, rec := range w.records {
		if rec.kind == kindRegular {
			break
		}
		c := findContainer(pod, rec.name)
		switch {
		case rec.run != nil:
			if rec.kind == kindInit {
				return // wait for it to finish
			}
			continue
		case rec.kind == kindInit && rec.terminated != nil && rec.terminated.ExitCode == 0:
			continue // completed
		case rec.terminated != nil && !w.shouldRestart(pod, rec):
			return // failed for good; phase() turns the pod Failed
		}
		w.tryStart(ctx, pod, rec, c)
		if rec.kind == kindInit {
			return // one init container at a time
		}
		if rec.run == nil && rec.terminated == nil {
			return // a sidecar that never started yet holds up what follows
		}
	}
	for _, rec := range w.records {
		if rec.kind != kindRegular || rec.run != nil {
			continue
		}
		if rec.terminated != nil && !w.shouldRestart(pod, rec) {
			rec.waiting = nil
			continue
		}
		w.tryStart(ctx, pod, rec, findContainer(pod, rec.name))
	}
}

// shouldRestart applies the restart policy to a container's last exit.
func (w *podWorker) shouldRestart(pod *corev1.Pod, rec *containerRecord) bool {
	if rec.kind == kindSidecar {
		return true
	}
	policy := pod.Spec.RestartPolicy
	if c := findContainer(pod, rec.name); c != nil && c.RestartPolicy != nil && rec.kind == kindRegular {
		policy = corev1.RestartPolicy(*c.RestartPolicy)
	}
	switch policy {
	case corev1.RestartPolicyAlways:
		return rec.kind == kindRegular || rec.terminated.ExitCode != 0
	case corev1.RestartPolicyOnFailure:
		return rec.terminated.ExitCode != 0
	}
	return false
}

// tryStart starts rec unless something keeps it waiting; the reason is
// left in rec.waiting for the status.
func (w *podWorker) tryStart(ctx context.Context, pod *corev1.Pod, rec *containerRecord, c *corev1.Container) {
	now := time.Now()
	if rec.terminated != nil && now.Before(rec.retryAt) {
		rec.waiting = &corev1.ContainerStateWaiting{
			Reason: "CrashLoopBackOff",
			Message: fmt.Sprintf("back-off %s restarting failed container=%s pod=%s_%s(%s)",
				rec.waited, rec.name, pod.Name, pod.Namespace, pod.UID),
		}
		w.wakeBy(rec.retryAt)
		return
	}
	img, ok := w.agent.images.lookup(c.Image)
	if !ok {
		if rec.imageMissing.IsZero() {
			rec.imageMissing = now
			w.logger.Info("image not in the image map", "container", rec.name, "image", c.Image)
		}
		if now.Sub(rec.imageMissing) < imagePullBackOffAfter {
			rec.waiting = &corev1.ContainerStateWaiting{
				Reason:  "ErrImagePull",
				Message: fmt.Sprintf("local node agent: image %q is not in the image map (%s)", c.Image, w.agent.images.describe()),
			}
			w.wakeBy(rec.imageMissing.Add(imagePullBackOffAfter))
		} else {
			rec.waiting = &corev1.ContainerStateWaiting{
				Reason:  "ImagePullBackOff",
				Message: fmt.Sprintf("Back-off pulling image %q", c.Image),
			}
			w.wakeBy(now.Add(pendingRetry))
		}
		return
	}
	rec.imageMissing = time.Time{}
	run, err := w.startContainer(ctx, pod, rec, c, img)
	if err != nil {
		var ce *configError
		reason := "RunContainerError"
		if errors.As(err, &ce) {
			reason = "CreateContainerConfigError"
		}
		if rec.waiting == nil || rec.waiting.Message != err.Error() {
			w.logger.Info("container cannot be started yet", "container", rec.name, "reason", reason, "err", err)
		}
		rec.waiting = &corev1.ContainerStateWaiting{Reason: reason, Message: err.Error()}
		w.wakeBy(now.Add(pendingRetry))
		return
	}
	if rec.terminated != nil {
		rec.lastTerminated = rec.terminated
		rec.terminated = nil
		rec.restartCount++
	}
	rec.waiting = nil
	rec.run = run
	w.agent.setRunning(w.uid, rec.name, true)
	w.logger.Info("container started", "container", rec.name, "pid", run.pid, "containerID", run.id, "restartCount", rec.restartCount)
}

// collectExits turns ended processes into terminated states.
func (w *podWorker) collectExits(pod *corev1.Pod) {
	for _, rec := range w.records {
		if rec.run == nil || !rec.run.exited() {
			continue
		}
		run := rec.run
		rec.run = nil
		w.agent.setRunning(w.uid, rec.name, false)
		term := w.finishRun(pod, rec, run)
		rec.terminated = term
		rec.waiting = nil
		// Crash back-off: doubles per exit, back to the start after a run
		// long enough to call the container healthy.
		ran := term.FinishedAt.Sub(term.StartedAt.Time)
		if ran >= crashBackoffReset {
			rec.backoff = crashBackoffInitial
		}
		rec.waited = rec.backoff
		rec.retryAt = time.Now().Add(rec.backoff)
		rec.backoff = min(rec.backoff*2, crashBackoffMax)
		w.logger.Info("container exited", "container", rec.name, "exitCode", term.ExitCode, "signal", term.Signal, "reason", term.Reason)
	}
}

// handleProbeKills stops containers whose liveness or startup probe gave
// up; the restart policy then decides, as after a crash.
func (w *podWorker) handleProbeKills(pod *corev1.Pod) {
	for _, rec := range w.records {
		if rec.run == nil || rec.run.probes == nil {
			continue
		}
		if which := rec.run.probes.failedFatally(); which != "" {
			grace := w.graceOf(pod, nil)
			if p := rec.run.probes.probe(which); p != nil && p.TerminationGracePeriodSeconds != nil {
				grace = max(time.Duration(*p.TerminationGracePeriodSeconds)*time.Second, minimumGrace)
			}
			w.logger.Info("container failed its "+which+" probe: killing it", "container", rec.name)
			stopRuns([]*containerRun{rec.run}, grace)
		}
	}
	w.collectExits(pod)
}

// stopAll stops every running container: regular and init containers
// first, sidecars after them, as the kubelet orders it, all within grace.
func (w *podWorker) stopAll(grace time.Duration) {
	deadline := time.Now().Add(grace)
	var main, sidecars []*containerRun
	for _, rec := range w.records {
		if rec.run == nil {
			continue
		}
		if rec.kind == kindSidecar {
			sidecars = append(sidecars, rec.run)
		} else {
			main = append(main, rec.run)
		}
	}
	stopRuns(main, grace)
	stopRuns(sidecars, max(time.Until(deadline), minimumGrace))
}

func (w *podWorker) anyRunning() bool {
	for _, rec := range w.records {
		if rec.run != nil {
			return true
		}
	}
	return false
}

// markTerminal freezes the containers' states for the final status: a
// container waiting for a restart shows its last run, one that never ran
// is reported as the kubelet reports it for a terminated pod.
func (w *podWorker) markTerminal(pod *corev1.Pod) {
	if !w.terminal {
		w.logger.Info("pod finished on this node; no container will start again")
	}
	w.terminal = true
	now := apiTime(time.Now())
	for _, rec := range w.records {
		if rec.run != nil {
			continue
		}
		rec.waiting = nil
		if rec.terminated == nil {
			rec.terminated = &corev1.ContainerStateTerminated{
				ExitCode: 137, Reason: reasonContainerStatusUnknown, Message: messageContainerNotLocated,
				FinishedAt: now,
			}
		}
	}
}

// deadlineExceeded applies activeDeadlineSeconds, counted from startTime.
func (w *podWorker) deadlineExceeded(pod *corev1.Pod, now time.Time) bool {
	ads := pod.Spec.ActiveDeadlineSeconds
	return ads != nil && !w.startTime.IsZero() && now.Sub(w.startTime) >= time.Duration(*ads)*time.Second
}

// graceOf is the grace period for stopping the pod: the deletion's when
// given, else spec.terminationGracePeriodSeconds, else 30 s.
func (w *podWorker) graceOf(pod *corev1.Pod, deletionGrace *int64) time.Duration {
	secs := int64(30)
	if pod != nil && pod.Spec.TerminationGracePeriodSeconds != nil {
		secs = *pod.Spec.TerminationGracePeriodSeconds
	}
	if deletionGrace != nil {
		secs = *deletionGrace
	}
	return max(time.Duration(secs)*time.Second, minimumGrace)
}

// finalDelete removes a terminated pod from the API: grace 0 because its
// containers are gone, a UID precondition so a new pod of the same name is
// never hit. Finalizers (the Job controller's) may keep the object a while.
func (w *podWorker) finalDelete(ctx context.Context, pod *corev1.Pod) {
	if w.deleted || w.anyRunning() || time.Since(w.deletedAt) < deleteRetry {
		return
	}
	if !w.statusIsFinal(pod) {
		return // the final status must reach the API first
	}
	w.deletedAt = time.Now()
	callCtx, cancel := w.agent.callContext(ctx)
	defer cancel()
	zero := int64(0)
	uid := pod.UID
	err := w.agent.client.CoreV1().Pods(pod.Namespace).Delete(callCtx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero,
		Preconditions:      &metav1.Preconditions{UID: &uid},
	})
	switch {
	case err == nil:
		w.deleted = true
		w.logger.Info("pod deleted from the API")
	case apierrors.IsNotFound(err) || apierrors.IsConflict(err):
		w.deleted = true // gone already, or another pod by now
	default:
		w.logger.Warn("deleting pod failed; will retry", "err", err)
	}
}

// statusIsFinal reports whether the API has (or was just sent) a terminal
// phase for the pod.
func (w *podWorker) statusIsFinal(pod *corev1.Pod) bool {
	if isTerminalPhase(pod.Status.Phase) {
		return true
	}
	return w.lastSent != nil && isTerminalPhase(w.lastSent.Phase)
}

// cleanUp runs once the pod is gone from the API: its processes are dead
// by now; its directory goes, its logs stay in root-dir/logs.
func (w *podWorker) cleanUp(pod *corev1.Pod) {
	w.agent.forgetPod(w.uid)
	if err := os.RemoveAll(w.agent.podDir(w.uid)); err != nil {
		w.logger.Warn("removing pod directory", "err", err)
	}
	w.logger.Info("pod removed from the node")
}

// shutdown stops the pod's containers when the agent stops. No status is
// reported (the API would be told by a restarted agent, as with a kubelet).
func (w *podWorker) shutdown() {
	pod, _ := w.snapshot()
	if w.anyRunning() {
		w.stopAll(w.graceOf(pod, nil))
		w.collectExits(pod)
	}
}

func isTerminalPhase(p corev1.PodPhase) bool {
	return p == corev1.PodSucceeded || p == corev1.PodFailed
}

// findStatus returns the API's status of the named container, init or not.
func findStatus(pod *corev1.Pod, name string) *corev1.ContainerStatus {
	for _, list := range [][]corev1.ContainerStatus{pod.Status.InitContainerStatuses, pod.Status.ContainerStatuses} {
		for i := range list {
			if list[i].Name == name {
				return &list[i]
			}
		}
	}
	return nil
}

// apiTime is t as the API stores it (whole seconds, UTC), so that statuses
// compare equal to what comes back from the API server.
func apiTime(t time.Time) metav1.Time {
	return metav1.NewTime(t.UTC().Truncate(time.Second))
}
