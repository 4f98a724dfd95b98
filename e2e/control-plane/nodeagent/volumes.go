package nodeagent

// Pod volumes as directories of the pod directory, which container-init
// bind-mounts on each volumeMount's mountPath. What the kubelet would put
// on a tmpfs or a disk is a plain directory here.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// podVolumes is the set-up state of one pod's volumes.
type podVolumes struct {
	// paths maps a volume name to the host path bound for it.
	paths map[string]string
	// readOnly marks volumes whose mounts are always read-only (API data:
	// secret, configMap, downwardAPI, projected), as the kubelet mounts them.
	readOnly map[string]bool
	// refreshAt is when the earliest service-account token of the pod
	// reaches 80% of its lifetime (zero: no token); the kubelet rotates
	// tokens then, and so does the agent.
	refreshAt time.Time
}

// volumeBuilder writes volume contents. It is shared by all pod workers.
type volumeBuilder struct {
	client      kubernetes.Interface
	objects     objectGetter
	allocatable corev1.ResourceList
	timeout     func(context.Context) (context.Context, context.CancelFunc)
}

// volumeError is a volume that cannot be set up yet; the pod stays
// Pending with its containers waiting in ContainerCreating, and the next
// sync tries again (the kubelet does the same, with a FailedMount event).
type volumeError struct {
	volume string
	err    error
}

func (e *volumeError) Error() string {
	return fmt.Sprintf("MountVolume.SetUp failed for volume %q : %v", e.volume, e.err)
}

// volumeFile is one file of an API-data volume.
type volumeFile struct {
	path  string // relative to the volume directory
	data  []byte
	mode  os.FileMode
	owner *int64 // uid to own the file, when the spec or token rules ask
}

// setUp prepares every volume of pod under volumesDir. It is idempotent:
// directories are reused and API-data files rewritten.
func (b *volumeBuilder) setUp(ctx context.Context, pod *corev1.Pod, volumesDir string) (*podVolumes, error) {
	pv := &podVolumes{paths: map[string]string{}, readOnly: map[string]bool{}}
	// Private to root: containers reach volumes through their bind mounts,
	// which do not need the host path to be searchable; other local users
	// do not get to read the pod's Secrets.
	if err := os.MkdirAll(volumesDir, 0o700); err != nil {
		return nil, err
	}
	var fsGroup *int64
	if sc := pod.Spec.SecurityContext; sc != nil {
		fsGroup = sc.FSGroup
	}
	for i := range pod.Spec.Volumes {
		v := &pod.Spec.Volumes[i]
		dir := filepath.Join(volumesDir, v.Name)
		switch {
		case v.EmptyDir != nil:
			// medium: Memory is a directory like any other and sizeLimit
			// is not enforced (no eviction manager here).
			if err := os.MkdirAll(dir, 0o777); err != nil {
				return nil, &volumeError{v.Name, err}
			}
			// World-writable like the kubelet's emptyDir, whatever the umask,
			// so containers running as any uid can use it.
			if err := os.Chmod(dir, 0o777); err != nil {
				return nil, &volumeError{v.Name, err}
			}
			if err := applyFSGroup(dir, fsGroup, true); err != nil {
				return nil, &volumeError{v.Name, err}
			}
			pv.paths[v.Name] = dir
		case v.HostPath != nil:
			if err := checkHostPath(v.HostPath); err != nil {
				return nil, &volumeError{v.Name, err}
			}
			pv.paths[v.Name] = v.HostPath.Path
		case v.Secret != nil, v.ConfigMap != nil, v.DownwardAPI != nil, v.Projected != nil:
			files, refreshAt, err := b.apiDataFiles(ctx, pod, v)
			if err != nil {
				return nil, &volumeError{v.Name, err}
			}
			if err := writeVolumeFiles(dir, files); err != nil {
				return nil, &volumeError{v.Name, err}
			}
			if err := applyFSGroup(dir, fsGroup, false); err != nil {
				return nil, &volumeError{v.Name, err}
			}
			if !refreshAt.IsZero() && (pv.refreshAt.IsZero() || refreshAt.Before(pv.refreshAt)) {
				pv.refreshAt = refreshAt
			}
			pv.paths[v.Name] = dir
			pv.readOnly[v.Name] = true
		default:
			return nil, &volumeError{v.Name, errors.New("this volume type is not supported by the local node agent (supported: emptyDir, hostPath, secret, configMap, downwardAPI, projected)")}
		}
	}
	return pv, nil
}

// apiDataFiles computes the files of a secret, configMap, downwardAPI or
// projected volume, and when its tokens should be refreshed.
func (b *volumeBuilder) apiDataFiles(ctx context.Context, pod *corev1.Pod, v *corev1.Volume) ([]volumeFile, time.Time, error) {
	switch {
	case v.Secret != nil:
		s := v.Secret
		return b.secretFiles(ctx, pod, s.SecretName, s.Items, s.Optional, modeOr(s.DefaultMode, 0o644))
	case v.ConfigMap != nil:
		c := v.ConfigMap
		return b.configMapFiles(ctx, pod, c.Name, c.Items, c.Optional, modeOr(c.DefaultMode, 0o644))
	case v.DownwardAPI != nil:
		files, err := downwardAPIFiles(pod, v.DownwardAPI.Items, modeOr(v.DownwardAPI.DefaultMode, 0o644), b.allocatable)
		return files, time.Time{}, err
	}
	// Projected: the union of its sources.
	p := v.Projected
	mode := modeOr(p.DefaultMode, 0o644)
	var all []volumeFile
	var refreshAt time.Time
	// Tokens last: when a ConfigMap of the volume is missing, retries do
	// not mint a token each time.
	sources := make([]corev1.VolumeProjection, 0, len(p.Sources))
	var tokens []corev1.VolumeProjection
	for _, src := range p.Sources {
		if src.ServiceAccountToken != nil {
			tokens = append(tokens, src)
		} else {
			sources = append(sources, src)
		}
	}
	for _, src := range append(sources, tokens...) {
		var files []volumeFile
		var err error
		switch {
		case src.Secret != nil:
			files, _, err = b.secretFiles(ctx, pod, src.Secret.Name, src.Secret.Items, src.Secret.Optional, mode)
		case src.ConfigMap != nil:
			files, _, err = b.configMapFiles(ctx, pod, src.ConfigMap.Name, src.ConfigMap.Items, src.ConfigMap.Optional, mode)
		case src.DownwardAPI != nil:
			files, err = downwardAPIFiles(pod, src.DownwardAPI.Items, mode, b.allocatable)
		case src.ServiceAccountToken != nil:
			var f volumeFile
			var at time.Time
			f, at, err = b.tokenFile(ctx, pod, src.ServiceAccountToken, mode, p.DefaultUser)
			files = []volumeFile{f}
			if refreshAt.IsZero() || at.Before(refreshAt) {
				refreshAt = at
			}
		default:
			err = errors.New("projected volume source not supported by the local node agent (supported: secret, configMap, downwardAPI, serviceAccountToken)")
		}
		if err != nil {
			return nil, time.Time{}, err
		}
		all = append(all, files...)
	}
	return all, refreshAt, nil
}

func (b *volumeBuilder) secretFiles(ctx context.Context, pod *corev1.Pod, name string, items []corev1.KeyToPath, optional *bool, mode os.FileMode) ([]volumeFile, time.Time, error) {
	s, err := b.objects.secret(ctx, pod.Namespace, name)
	if err != nil {
		if isNotFound(err) && optional != nil && *optional {
			return nil, time.Time{}, nil
		}
		return nil, time.Time{}, err
	}
	files, err := keyedFiles(s.Data, items, optional, mode, "Secret", pod.Namespace, name)
	return files, time.Time{}, err
}

func (b *volumeBuilder) configMapFiles(ctx context.Context, pod *corev1.Pod, name string, items []corev1.KeyToPath, optional *bool, mode os.FileMode) ([]volumeFile, time.Time, error) {
	c, err := b.objects.configMap(ctx, pod.Namespace, name)
	if err != nil {
		if isNotFound(err) && optional != nil && *optional {
			return nil, time.Time{}, nil
		}
		return nil, time.Time{}, err
	}
	data := make(map[string][]byte, len(c.Data)+len(c.BinaryData))
	for k, v := range c.Data {
		data[k] = []byte(v)
	}
	for k, v := range c.BinaryData {
		data[k] = v
	}
	files, err := keyedFiles(data, items, optional, mode, "ConfigMap", pod.Namespace, name)
	return files, time.Time{}, err
}

// keyedFiles maps Secret/ConfigMap keys to files: every key under its own
// name, or only the listed items under their paths.
func keyedFiles(data map[string][]byte, items []corev1.KeyToPath, optional *bool, mode os.FileMode, kind, ns, name string) ([]volumeFile, error) {
	var out []volumeFile
	if len(items) == 0 {
		for _, k := range sortedKeys(data) {
			out = append(out, volumeFile{path: k, data: data[k], mode: mode})
		}
		return out, nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if optional != nil && *optional {
				continue
			}
			return nil, fmt.Errorf("configured to use key %s of %s %s/%s, which does not exist", it.Key, kind, ns, name)
		}
		out = append(out, volumeFile{path: it.Path, data: v, mode: modeOr(it.Mode, mode), owner: it.User})
	}
	return out, nil
}

// downwardAPIFiles renders downward API items (pod fields and container
// resources) as files.
func downwardAPIFiles(pod *corev1.Pod, items []corev1.DownwardAPIVolumeFile, mode os.FileMode, allocatable corev1.ResourceList) ([]volumeFile, error) {
	var out []volumeFile
	for _, it := range items {
		var value string
		var err error
		switch {
		case it.FieldRef != nil:
			value, err = podFieldValue(pod, it.FieldRef.FieldPath)
		case it.ResourceFieldRef != nil:
			c := findContainer(pod, it.ResourceFieldRef.ContainerName)
			if c == nil {
				return nil, fmt.Errorf("container %q of resourceFieldRef not found", it.ResourceFieldRef.ContainerName)
			}
			value, err = resourceFieldValue(it.ResourceFieldRef, c, allocatable)
		default:
			err = fmt.Errorf("downward API item %q has no source", it.Path)
		}
		if err != nil {
			return nil, err
		}
		out = append(out, volumeFile{path: it.Path, data: []byte(value), mode: modeOr(it.Mode, mode), owner: it.User})
	}
	return out, nil
}

// tokenFile requests a service-account token bound to the pod through the
// TokenRequest API, as the kubelet does for projected token sources: it
// is invalidated when the pod is deleted, and an empty audience means the
// API server's own.
func (b *volumeBuilder) tokenFile(ctx context.Context, pod *corev1.Pod, src *corev1.ServiceAccountTokenProjection, mode os.FileMode, defaultUser *int64) (volumeFile, time.Time, error) {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	expiration := int64(3600)
	if src.ExpirationSeconds != nil {
		expiration = *src.ExpirationSeconds
	}
	req := &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			ExpirationSeconds: &expiration,
			BoundObjectRef: &authenticationv1.BoundObjectReference{
				APIVersion: "v1", Kind: "Pod", Name: pod.Name, UID: pod.UID,
			},
		},
	}
	if src.Audience != "" {
		req.Spec.Audiences = []string{src.Audience}
	}
	callCtx, cancel := b.timeout(ctx)
	defer cancel()
	issued := time.Now()
	tr, err := b.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(callCtx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return volumeFile{}, time.Time{}, fmt.Errorf("failed to fetch token: %w", err)
	}
	expires := tr.Status.ExpirationTimestamp.Time
	if expires.IsZero() || !expires.After(issued) {
		expires = issued.Add(time.Duration(expiration) * time.Second)
	}
	refreshAt := issued.Add(expires.Sub(issued) * 8 / 10)
	f := volumeFile{path: src.Path, data: []byte(tr.Status.Token), mode: mode, owner: src.User}
	if f.owner == nil {
		f.owner = defaultUser
	}
	// Like the kubelet: when every container runs as the same non-root
	// user and no fsGroup grants access, the token is that user's alone.
	if f.owner == nil {
		if uid := commonRunAsUser(pod); uid != nil && *uid != 0 && (pod.Spec.SecurityContext == nil || pod.Spec.SecurityContext.FSGroup == nil) {
			f.owner, f.mode = uid, 0o600
		}
	}
	return f, refreshAt, nil
}

// commonRunAsUser is the uid all containers of pod run as, if they agree.
func commonRunAsUser(pod *corev1.Pod) *int64 {
	var uid *int64
	all := append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...)
	for i := range all {
		u, _ := effectiveUser(pod, &all[i])
		if u == nil {
			return nil
		}
		if uid != nil && *uid != *u {
			return nil
		}
		uid = u
	}
	return uid
}

// writeVolumeFiles writes files into dir, each through a temporary file
// and a rename so a container reading a rotated token never sees half of
// it. Paths cannot leave dir.
func writeVolumeFiles(dir string, files []volumeFile) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, f := range files {
		clean := filepath.Clean("/" + f.path)[1:]
		if clean == "" || strings.HasPrefix(f.path, "/") || hasDotDot(f.path) {
			return fmt.Errorf("invalid file path %q in volume", f.path)
		}
		target := filepath.Join(dir, clean)
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		tmp, err := os.CreateTemp(filepath.Dir(target), ".tmp-")
		if err != nil {
			return err
		}
		_, werr := tmp.Write(f.data)
		cerr := tmp.Close()
		if err := errors.Join(werr, cerr, os.Chmod(tmp.Name(), f.mode)); err != nil {
			_ = os.Remove(tmp.Name())
			return err
		}
		if f.owner != nil {
			if err := os.Chown(tmp.Name(), int(*f.owner), -1); err != nil {
				_ = os.Remove(tmp.Name())
				return err
			}
		}
		if err := os.Rename(tmp.Name(), target); err != nil {
			_ = os.Remove(tmp.Name())
			return err
		}
	}
	return nil
}

// applyFSGroup gives the pod's fsGroup access to a volume, as the kubelet
// does: group ownership, group read (and write for writable volumes) and
// setgid directories so new files inherit the group.
func applyFSGroup(dir string, fsGroup *int64, writable bool) error {
	if fsGroup == nil {
		return nil
	}
	gid := int(*fsGroup)
	return filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if err := os.Lchown(p, -1, gid); err != nil {
			return err
		}
		if info.Mode()&os.ModeSymlink != 0 {
			return nil
		}
		mode := info.Mode().Perm() | 0o040
		if writable {
			mode |= 0o020
		}
		if info.IsDir() {
			mode |= 0o010
			return os.Chmod(p, mode|os.ModeSetgid)
		}
		return os.Chmod(p, mode)
	})
}

// checkHostPath applies a hostPath volume's type: creating for the
// *OrCreate types, checking existence and kind for the others.
func checkHostPath(hp *corev1.HostPathVolumeSource) error {
	t := corev1.HostPathUnset
	if hp.Type != nil {
		t = *hp.Type
	}
	switch t {
	case corev1.HostPathDirectoryOrCreate:
		return os.MkdirAll(hp.Path, 0o755)
	case corev1.HostPathFileOrCreate:
		if err := os.MkdirAll(filepath.Dir(hp.Path), 0o755); err != nil {
			return err
		}
		f, err := os.OpenFile(hp.Path, os.O_RDONLY|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		return f.Close()
	case corev1.HostPathUnset:
		return nil
	}
	st, err := os.Stat(hp.Path)
	if err != nil {
		return fmt.Errorf("hostPath type check failed: %s: %w", hp.Path, err)
	}
	ok := true
	switch t {
	case corev1.HostPathDirectory:
		ok = st.IsDir()
	case corev1.HostPathFile:
		ok = st.Mode().IsRegular()
	case corev1.HostPathSocket:
		ok = st.Mode()&os.ModeSocket != 0
	case corev1.HostPathCharDev:
		ok = st.Mode()&os.ModeCharDevice != 0
	case corev1.HostPathBlockDev:
		ok = st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0
	}
	if !ok {
		return fmt.Errorf("hostPath type check failed: %s is not a %s", hp.Path, t)
	}
	return nil
}

// hasDotDot reports whether a relative path has a ".." element.
func hasDotDot(p string) bool {
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return true
		}
	}
	return false
}

func modeOr(m *int32, def os.FileMode) os.FileMode {
	if m == nil {
		return def
	}
	return os.FileMode(*m) & 0o777
}
