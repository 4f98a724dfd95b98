// Package nodeagent is a simulated kubelet for a local test control plane.
//
// It plays the kubelet of one Ready Node for a control plane that runs as
// processes on loopback (etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler) on a machine without a container runtime. Each container
// of a pod bound to its node runs as a local process, so that the real
// controllers (the Job controller above all) judge success, failure and
// back-off from the statuses it reports.
//
// What is real:
//   - the Node object, its Lease heartbeat and Ready condition, so the node
//     lifecycle controller and the scheduler treat it as a node;
//   - the pod life cycle as the kubelet drives it: init containers, restart
//     policies (Never, OnFailure, Always) with crash back-off and
//     restartCount, phases Pending/Running/Succeeded/Failed, conditions,
//     container states with exit codes, signals and reasons (Completed,
//     Error, OOMKilled, StartError, ContainerStatusUnknown), termination
//     messages (including FallbackToLogsOnError), activeDeadlineSeconds,
//     graceful deletion (SIGTERM, grace period, SIGKILL, then the final
//     delete with grace 0 and a UID precondition);
//   - environment resolution: env with $(VAR) expansion, envFrom, Secrets,
//     ConfigMaps, the downward API, resourceFieldRef; missing references
//     give CreateContainerConfigError until they exist;
//   - volumes: emptyDir, hostPath, secret, configMap, downwardAPI and
//     projected (with service-account tokens from the TokenRequest API,
//     bound to the pod and rotated at 80% of their life), bind-mounted on
//     their mountPath (with subPath) in a private mount namespace;
//   - securityContext: runAsUser/runAsGroup/runAsNonRoot, fsGroup and
//     supplementalGroups, readOnlyRootFilesystem, allowPrivilegeEscalation;
//   - memory limits, enforced by a cgroup v1 memory cgroup per container
//     (under a directory of the agent's own, so agents of clusters side
//     by side never touch each other's), so the kernel's OOM kill is what
//     reports OOMKilled;
//   - startup, readiness and liveness probes (exec, httpGet, tcpSocket,
//     grpc) with their timing and thresholds;
//   - container logs through the API server (kubectl logs) via an HTTPS
//     endpoint serving /containerLogs.
//
// What is simulated or missing:
//   - processes instead of containers: no image file system (the container
//     sees the host's, made read-only on request), no pid, network, IPC or
//     UTS namespace. Every pod shares the host network; hostIP and podIP
//     are 127.0.0.1, so two pods listening on one port collide;
//   - no image pulls: an image is "present" when the --images JSON map
//     names it, by exact reference (a different tag or registry is a
//     different image, as in a registry); its entry gives a host binary as
//     ENTRYPOINT and optional CMD. A missing image gives ErrImagePull, then
//     ImagePullBackOff; the map is reread when the file changes;
//   - no CPU limits or requests enforcement, no ephemeral-storage limits,
//     emptyDir sizeLimit ignored and medium Memory is a plain directory;
//     no eviction, so the node never reports pressure;
//   - no lifecycle hooks (postStart, preStop), no exec/attach/port-forward,
//     no kubectl logs --previous or --timestamps, no metrics or stats;
//   - persistentVolumeClaim, CSI, ephemeral and image volumes are not
//     supported (the pod stays in ContainerCreating with a message);
//   - mount points missing on the host (e.g. /dev/termination-log,
//     /var/run/secrets/kubernetes.io/serviceaccount) are created on the
//     host file system before the bind mount, empty;
//   - secret and configMap volume contents are written when the pod starts
//     and not updated afterwards (tokens are rotated);
//   - capabilities, seccomp, AppArmor and SELinux settings are ignored;
//     a container without runAsUser runs as root, like an image without
//     USER; runAsNonRoot without runAsUser runs as 65532:65532 (distroless
//     nonroot), as there is no image metadata to consult;
//   - stopping a container sends SIGTERM to its whole process group (a
//     runtime signals only PID 1), and when its main process ends, what
//     is left of the group is killed (as a pid namespace would be); a
//     process that leaves the group escapes unless a memory cgroup holds
//     it. A shell as main process gets signals like any process (PID 1 of
//     a container ignores those it has no handler for);
//   - containers of an agent that crashed are killed when it starts again
//     and reported as ContainerStatusUnknown (exit code 137); a clean stop
//     of the agent stops its containers and reports nothing, like a kubelet.
//
// Without root the agent still runs containers that need no mount, user or
// memory limit; others wait with RunContainerError.
//
// Entry points: Main (the node-agent subcommand) and ContainerInitMain (the
// hidden container-init subcommand that the agent execs as
// /proc/self/exe container-init SPEC.json to set up and exec one container).
package nodeagent
