package nodeagent

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
)

// imageEntry is what the node knows of one image: the host binary standing
// in for its ENTRYPOINT and, optionally, its CMD.
type imageEntry struct {
	// Entrypoint is the image's ENTRYPOINT: an absolute host path followed
	// by arguments that are always passed (unless the container sets
	// `command`, which replaces all of it).
	Entrypoint []string `json:"entrypoint"`
	// Cmd is the image's CMD: default arguments that a container's `args`
	// replace. Optional; most entries have none.
	Cmd []string `json:"cmd,omitempty"`
}

// imageMapFile is the layout of the --images file:
//
//	{"images": {"registry.example/app:v1": {"entrypoint": ["/abs/bin", "arg"], "cmd": ["--flag"]}}}
type imageMapFile struct {
	Images map[string]imageEntry `json:"images"`
}

// imageMap answers "is this image present on the node?". References are
// matched exactly, as a registry resolves a tag: "app:v1" does not match
// "app:v2", "app" or "docker.io/library/app:v1". The file is read again
// when it changes, so a test can add an image while a pod is in
// ImagePullBackOff and see it start, as after a real push.
type imageMap struct {
	path string

	mu      sync.Mutex
	modTime time.Time
	size    int64
	images  map[string]imageEntry
	loadErr error
}

func newImageMap(path string) (*imageMap, error) {
	m := &imageMap{path: path}
	if path == "" {
		return m, nil
	}
	m.reloadLocked()
	return m, m.loadErr
}

// lookup returns the entry for an exact image reference.
func (m *imageMap) lookup(ref string) (imageEntry, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.path == "" {
		return imageEntry{}, false
	}
	m.reloadLocked()
	e, ok := m.images[ref]
	return e, ok
}

// describe names the source of the map in "not in the image map" messages.
func (m *imageMap) describe() string {
	if m.path == "" {
		return "no --images file given"
	}
	return m.path
}

// reloadLocked rereads the file when its size or mtime changed. A file that
// became unreadable or invalid keeps the last good map (a half-written file
// must not make every image vanish).
func (m *imageMap) reloadLocked() {
	st, err := os.Stat(m.path)
	if err != nil {
		m.loadErr = err
		return
	}
	if m.images != nil && st.ModTime().Equal(m.modTime) && st.Size() == m.size {
		return
	}
	raw, err := os.ReadFile(m.path)
	if err != nil {
		m.loadErr = err
		return
	}
	var f imageMapFile
	if err := json.Unmarshal(raw, &f); err != nil {
		m.loadErr = fmt.Errorf("image map %s: %w", m.path, err)
		return
	}
	for ref, e := range f.Images {
		if len(e.Entrypoint) == 0 || !isAbs(e.Entrypoint[0]) {
			m.loadErr = fmt.Errorf("image map %s: image %q: entrypoint must start with an absolute path", m.path, ref)
			return
		}
	}
	if f.Images == nil {
		f.Images = map[string]imageEntry{}
	}
	m.images, m.modTime, m.size, m.loadErr = f.Images, st.ModTime(), st.Size(), nil
}

func isAbs(p string) bool { return len(p) > 0 && p[0] == '/' }
