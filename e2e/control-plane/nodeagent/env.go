package nodeagent

// Environment resolution, as the kubelet does it before creating a
// container: envFrom first, then env in order (later entries override
// earlier ones and envFrom, and the last of duplicate names wins), $(VAR)
// references expanded against what is defined so far, values from Secrets,
// ConfigMaps, the downward API and the container's resources.

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// configError is a problem in a pod's configuration that keeps a container
// from being created (a missing Secret, ConfigMap or key). The kubelet
// reports it as waiting reason CreateContainerConfigError and tries again
// on later syncs, so creating the object later lets the pod start.
type configError struct{ msg string }

func (e *configError) Error() string { return e.msg }

func configErrorf(format string, args ...any) error {
	return &configError{msg: fmt.Sprintf(format, args...)}
}

// objectGetter reads the Secrets and ConfigMaps a pod refers to. Its errors
// are already phrased as the kubelet phrases them (`secret "x" not found`).
type objectGetter interface {
	secret(ctx context.Context, namespace, name string) (*corev1.Secret, error)
	configMap(ctx context.Context, namespace, name string) (*corev1.ConfigMap, error)
}

// clientGetter is the objectGetter of a running agent: a GET per use, so a
// Secret created after the pod is seen on the next sync (the kubelet uses
// watches; for a test node plain GETs are simpler and just as fresh).
type clientGetter struct {
	client  kubernetes.Interface
	timeout func(context.Context) (context.Context, context.CancelFunc)
}

func (g clientGetter) secret(ctx context.Context, ns, name string) (*corev1.Secret, error) {
	ctx, cancel := g.timeout(ctx)
	defer cancel()
	s, err := g.client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, &notFoundError{kind: "secret", name: name}
	}
	return s, err
}

func (g clientGetter) configMap(ctx context.Context, ns, name string) (*corev1.ConfigMap, error) {
	ctx, cancel := g.timeout(ctx)
	defer cancel()
	c, err := g.client.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, &notFoundError{kind: "configmap", name: name}
	}
	return c, err
}

// notFoundError is a missing Secret or ConfigMap, worded like the kubelet's
// object caches word it (singular kind, unlike the API's "secrets").
type notFoundError struct{ kind, name string }

func (e *notFoundError) Error() string { return fmt.Sprintf("%s %q not found", e.kind, e.name) }

// envContext is everything environment resolution reads.
type envContext struct {
	pod       *corev1.Pod
	container *corev1.Container
	// allocatable stands in for unset limits in resourceFieldRef, as on a
	// real node (a container without a limit may use the whole node).
	allocatable corev1.ResourceList
	// serviceEnv is what the kubelet derives from Services; here only the
	// API server's address (KUBERNETES_SERVICE_HOST/PORT).
	serviceEnv map[string]string
	// defaultPath is PATH when neither the image nor the pod sets one
	// (the image of a local process is the host, so the agent's PATH).
	defaultPath string
	objects     objectGetter
}

// resolvedEnv is a container's environment: list for execve, vars for
// $(VAR) expansion in command, args and subPathExpr.
type resolvedEnv struct {
	list []string
	vars map[string]string
}

// orderedEnv is a map that remembers where each name was first defined, so
// the environment handed to the process is deterministic.
type orderedEnv struct {
	order  []string
	values map[string]string
}

func newOrderedEnv() *orderedEnv { return &orderedEnv{values: map[string]string{}} }

func (o *orderedEnv) set(k, v string) {
	if _, ok := o.values[k]; !ok {
		o.order = append(o.order, k)
	}
	o.values[k] = v
}

// resolveEnv computes the environment of ec.container. Errors are
// *configError for problems the pod's author must fix.
func resolveEnv(ctx context.Context, ec envContext) (resolvedEnv, error) {
	pod, c := ec.pod, ec.container
	user := newOrderedEnv()

	for _, from := range c.EnvFrom {
		switch {
		case from.ConfigMapRef != nil:
			ref := from.ConfigMapRef
			cm, err := ec.objects.configMap(ctx, pod.Namespace, ref.Name)
			if err != nil {
				if isNotFound(err) && ref.Optional != nil && *ref.Optional {
					continue
				}
				return resolvedEnv{}, asConfigError(err)
			}
			for _, k := range sortedKeys(cm.Data) {
				setFromSource(user, from.Prefix+k, cm.Data[k])
			}
		case from.SecretRef != nil:
			ref := from.SecretRef
			s, err := ec.objects.secret(ctx, pod.Namespace, ref.Name)
			if err != nil {
				if isNotFound(err) && ref.Optional != nil && *ref.Optional {
					continue
				}
				return resolvedEnv{}, asConfigError(err)
			}
			for _, k := range sortedKeys(s.Data) {
				setFromSource(user, from.Prefix+k, string(s.Data[k]))
			}
		}
	}

	// $(VAR) in a value sees envFrom, earlier env entries and the service
	// variables (user values shadow service ones), not HOSTNAME or PATH,
	// which the runtime adds later.
	lookup := func(name string) (string, bool) {
		if v, ok := user.values[name]; ok {
			return v, true
		}
		v, ok := ec.serviceEnv[name]
		return v, ok
	}
	for i := range c.Env {
		e := &c.Env[i]
		if e.ValueFrom == nil {
			user.set(e.Name, expandVars(e.Value, lookup))
			continue
		}
		v, ok, err := envValueFrom(ctx, ec, e.ValueFrom)
		if err != nil {
			return resolvedEnv{}, err
		}
		if ok {
			user.set(e.Name, v)
		}
	}

	// The process environment: runtime defaults, then the service
	// variables, then the user's, each overriding the former.
	final := newOrderedEnv()
	final.set("HOSTNAME", podHostname(pod))
	if ec.defaultPath != "" {
		final.set("PATH", ec.defaultPath)
	}
	vars := map[string]string{}
	for _, k := range sortedKeys(ec.serviceEnv) {
		final.set(k, ec.serviceEnv[k])
		vars[k] = ec.serviceEnv[k]
	}
	for _, k := range user.order {
		final.set(k, user.values[k])
		vars[k] = user.values[k]
	}
	list := make([]string, 0, len(final.order))
	for _, k := range final.order {
		list = append(list, k+"="+final.values[k])
	}
	return resolvedEnv{list: list, vars: vars}, nil
}

// setFromSource adds one envFrom key; keys that cannot be variable names
// are skipped, as the kubelet skips them (with an event there).
func setFromSource(env *orderedEnv, name, value string) {
	if name == "" || strings.ContainsAny(name, "=\x00") {
		return
	}
	env.set(name, value)
}

// envValueFrom resolves one valueFrom. ok is false when an optional source
// is missing: the variable is then not set at all.
func envValueFrom(ctx context.Context, ec envContext, from *corev1.EnvVarSource) (value string, ok bool, err error) {
	pod := ec.pod
	switch {
	case from.FieldRef != nil:
		v, err := podFieldValue(pod, from.FieldRef.FieldPath)
		if err != nil {
			return "", false, &configError{msg: err.Error()}
		}
		return v, true, nil
	case from.ResourceFieldRef != nil:
		target := ec.container
		if from.ResourceFieldRef.ContainerName != "" {
			target = findContainer(pod, from.ResourceFieldRef.ContainerName)
			if target == nil {
				return "", false, configErrorf("container %q referenced by resourceFieldRef not found", from.ResourceFieldRef.ContainerName)
			}
		}
		v, err := resourceFieldValue(from.ResourceFieldRef, target, ec.allocatable)
		if err != nil {
			return "", false, &configError{msg: err.Error()}
		}
		return v, true, nil
	case from.ConfigMapKeyRef != nil:
		ref := from.ConfigMapKeyRef
		optional := ref.Optional != nil && *ref.Optional
		cm, err := ec.objects.configMap(ctx, pod.Namespace, ref.Name)
		if err != nil {
			if isNotFound(err) && optional {
				return "", false, nil
			}
			return "", false, asConfigError(err)
		}
		if v, found := cm.Data[ref.Key]; found {
			return v, true, nil
		}
		if v, found := cm.BinaryData[ref.Key]; found {
			return string(v), true, nil
		}
		if optional {
			return "", false, nil
		}
		return "", false, configErrorf("couldn't find key %s in ConfigMap %s/%s", ref.Key, pod.Namespace, ref.Name)
	case from.SecretKeyRef != nil:
		ref := from.SecretKeyRef
		optional := ref.Optional != nil && *ref.Optional
		s, err := ec.objects.secret(ctx, pod.Namespace, ref.Name)
		if err != nil {
			if isNotFound(err) && optional {
				return "", false, nil
			}
			return "", false, asConfigError(err)
		}
		if v, found := s.Data[ref.Key]; found {
			return string(v), true, nil
		}
		if optional {
			return "", false, nil
		}
		return "", false, configErrorf("couldn't find key %s in Secret %s/%s", ref.Key, pod.Namespace, ref.Name)
	case from.FileKeyRef != nil:
		return "", false, configErrorf("env valueFrom.fileKeyRef is not supported by the local node agent")
	}
	return "", false, configErrorf("env valueFrom has no source set")
}

func isNotFound(err error) bool {
	_, ok := err.(*notFoundError)
	return ok || apierrors.IsNotFound(err)
}

// asConfigError keeps a not-found as a configuration error; other errors
// (API timeouts) are transient and reported the same way, since the
// container cannot be created either way and the next sync retries.
func asConfigError(err error) error {
	if _, ok := err.(*configError); ok {
		return err
	}
	return &configError{msg: err.Error()}
}

// expandVars replaces $(NAME) with the value of NAME when lookup knows it
// and leaves the reference as written otherwise; $$ is an escaped $. This
// is the Kubernetes expansion syntax for env values, command, args and
// subPathExpr (not the shell's: $NAME and ${NAME} are left alone).
func expandVars(s string, lookup func(string) (string, bool)) string {
	if !strings.Contains(s, "$") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				// An unterminated reference is kept as text.
				b.WriteString("$(")
				i++
				continue
			}
			name := s[i+2 : i+2+end]
			if v, ok := lookup(name); ok {
				b.WriteString(v)
			} else {
				b.WriteString("$(" + name + ")")
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}

// mapLookup adapts a map for expandVars.
func mapLookup(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		v, ok := m[k]
		return v, ok
	}
}

// podFieldValue is the downward API's view of a pod field. The node is
// 127.0.0.1 and every pod shares its network, so both IPs are the host's.
func podFieldValue(pod *corev1.Pod, path string) (string, error) {
	if base, key, ok := parseSubscript(path); ok {
		switch base {
		case "metadata.labels":
			return pod.Labels[key], nil
		case "metadata.annotations":
			return pod.Annotations[key], nil
		}
		return "", fmt.Errorf("unsupported fieldPath %q", path)
	}
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return formatMap(pod.Labels), nil
	case "metadata.annotations":
		return formatMap(pod.Annotations), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP", "status.hostIPs", "status.podIP", "status.podIPs":
		return nodeIP, nil
	}
	return "", fmt.Errorf("unsupported fieldPath %q", path)
}

// parseSubscript splits "metadata.labels['key']" into its parts.
func parseSubscript(path string) (base, key string, ok bool) {
	open := strings.Index(path, "['")
	if open < 0 || !strings.HasSuffix(path, "']") || open+2 > len(path)-2 {
		return "", "", false
	}
	return path[:open], path[open+2 : len(path)-2], true
}

// formatMap renders labels or annotations as the downward API does in
// volume files: sorted key="quoted value" lines.
func formatMap(m map[string]string) string {
	lines := make([]string, 0, len(m))
	for _, k := range sortedKeys(m) {
		lines = append(lines, fmt.Sprintf("%s=%q", k, m[k]))
	}
	return strings.Join(lines, "\n")
}

// resourceFieldValue renders a container resource through a divisor,
// rounding up as the kubelet does (0.5 CPU with divisor 1 is "1"). An unset
// limit is the node's allocatable amount.
func resourceFieldValue(fs *corev1.ResourceFieldSelector, c *corev1.Container, allocatable corev1.ResourceList) (string, error) {
	kind, name, ok := strings.Cut(fs.Resource, ".")
	if !ok || (kind != "limits" && kind != "requests") {
		return "", fmt.Errorf("unsupported resource %q in resourceFieldRef", fs.Resource)
	}
	var q resource.Quantity
	if kind == "limits" {
		if v, set := c.Resources.Limits[corev1.ResourceName(name)]; set {
			q = v
		} else if v, set := allocatable[corev1.ResourceName(name)]; set {
			q = v
		}
	} else if v, set := c.Resources.Requests[corev1.ResourceName(name)]; set {
		q = v
	}
	divisor := fs.Divisor
	if divisor.IsZero() {
		divisor = resource.MustParse("1")
	}
	if name == string(corev1.ResourceCPU) {
		return strconv.FormatInt(int64(math.Ceil(float64(q.MilliValue())/float64(divisor.MilliValue()))), 10), nil
	}
	if divisor.Value() == 0 {
		return "", fmt.Errorf("invalid divisor %s for %s", divisor.String(), fs.Resource)
	}
	return strconv.FormatInt(int64(math.Ceil(float64(q.Value())/float64(divisor.Value()))), 10), nil
}

// podHostname is the pod's hostname as a runtime sets it: spec.hostname
// when given, else the pod's name (at most 63 characters).
func podHostname(pod *corev1.Pod) string {
	h := pod.Spec.Hostname
	if h == "" {
		h = pod.Name
	}
	if len(h) > 63 {
		h = strings.TrimRight(h[:63], "-.")
	}
	return h
}

// findContainer returns the named container (regular or init) of pod.
func findContainer(pod *corev1.Pod, name string) *corev1.Container {
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == name {
			return &pod.Spec.InitContainers[i]
		}
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
