package nodeagent

// The node's HTTPS endpoint, the part of the kubelet API that `kubectl
// logs` needs: the API server proxies pods/log to
// https://<InternalIP>:<daemonEndpoints.kubeletEndpoint.port>/containerLogs/...

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
)

// listen opens the endpoint's port early, so that the Node can be
// registered with the real port when --kubelet-port is 0.
func (a *Agent) listen() error {
	ln, err := net.Listen("tcp", net.JoinHostPort(nodeIP, strconv.Itoa(a.cfg.KubeletPort)))
	if err != nil {
		return fmt.Errorf("log endpoint: %w", err)
	}
	a.listener = ln
	a.kubeletPort = ln.Addr().(*net.TCPAddr).Port
	return nil
}

// serveLogs serves the endpoint until ctx ends.
func (a *Agent) serveLogs(ctx context.Context) error {
	tlsCfg, err := a.serverTLS()
	if err != nil {
		a.listener.Close()
		a.logger.Error("log endpoint disabled", "err", err)
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	})
	mux.HandleFunc("GET /containerLogs/{namespace}/{pod}/{container}", a.handleContainerLogs)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, fmt.Sprintf("%s is not served by the local node agent (only /containerLogs and /healthz)", r.URL.Path), http.StatusNotFound)
	})
	srv := &http.Server{Handler: mux, TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()
	a.logger.Info("log endpoint listening", "addr", a.listener.Addr().String())
	err = srv.ServeTLS(a.listener, "", "")
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// serverTLS uses the given certificate, or a self-signed one (the API
// server does not verify kubelet serving certificates unless given
// --kubelet-certificate-authority), and checks client certificates
// against --client-ca-file when given.
func (a *Agent) serverTLS() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if a.cfg.TLSCertFile != "" {
		cert, err := tls.LoadX509KeyPair(a.cfg.TLSCertFile, a.cfg.TLSKeyFile)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{cert}
	} else {
		cert, err := selfSignedCert(a.nodeName)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if a.cfg.ClientCAFile != "" {
		pem, err := os.ReadFile(a.cfg.ClientCAFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", a.cfg.ClientCAFile)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

func selfSignedCert(nodeName string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: nodeName},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP(nodeIP)},
		DNSNames:     []string{nodeName, "localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// handleContainerLogs answers GET /containerLogs/{namespace}/{pod}/{container}
// with the container's log: all runs appended, as the file holds them.
// Supported: tailLines, limitBytes, follow (until the container stops).
// previous, timestamps, sinceSeconds and sinceTime are ignored: the log
// file has no per-line timestamps nor run boundaries.
func (a *Agent) handleContainerLogs(w http.ResponseWriter, r *http.Request) {
	ns, name, container := r.PathValue("namespace"), r.PathValue("pod"), r.PathValue("container")
	if a.podLister == nil {
		http.Error(w, "node agent is starting", http.StatusServiceUnavailable)
		return
	}
	pod, err := a.podLister.Pods(ns).Get(name)
	if err != nil {
		status := http.StatusInternalServerError
		if apierrors.IsNotFound(err) {
			status = http.StatusNotFound
		}
		http.Error(w, fmt.Sprintf("pod %s/%s not found on node %s", ns, name, a.nodeName), status)
		return
	}
	if findContainer(pod, container) == nil {
		http.Error(w, fmt.Sprintf("container %s is not valid for pod %s", container, name), http.StatusNotFound)
		return
	}
	q := r.URL.Query()
	limit := int64(-1)
	if v := q.Get("limitBytes"); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n > 0 {
			limit = n
		}
	}
	tail := -1
	if v := q.Get("tailLines"); v != "" {
		if n, err := strconv.Atoi(v); err == nil && n >= 0 {
			tail = n
		}
	}
	follow, _ := strconv.ParseBool(q.Get("follow"))

	f, err := os.Open(a.logPath(pod, container))
	if err != nil {
		http.Error(w, fmt.Sprintf("container %q in pod %q is waiting to start", container, name), http.StatusBadRequest)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	offset := int64(0)
	if tail >= 0 {
		offset = tailOffset(f, st.Size(), tail)
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	rc := http.NewResponseController(w)
	copyChunk := func() (int64, error) {
		var src io.Reader = f
		if limit >= 0 {
			src = io.LimitReader(f, limit)
		}
		n, err := io.Copy(w, src)
		if limit >= 0 {
			limit -= n
		}
		return n, err
	}
	if _, err := copyChunk(); err != nil || !follow {
		return
	}
	_ = rc.Flush()
	// follow: poll for appended output while the container runs.
	for limit != 0 {
		running := a.isRunning(pod.UID, container)
		n, err := copyChunk()
		if err != nil {
			return
		}
		if n > 0 {
			_ = rc.Flush()
			continue
		}
		if !running {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// tailOffset is where the last n lines of a file of the given size start
// (a final newline does not start another line).
func tailOffset(f *os.File, size int64, n int) int64 {
	if n == 0 {
		return size
	}
	const chunk = 32 * 1024
	buf := make([]byte, chunk)
	pos := size
	lines := 0
	skipLast := true // the newline ending the file ends the last line
	for pos > 0 {
		readSize := int64(chunk)
		if pos < readSize {
			readSize = pos
		}
		pos -= readSize
		if _, err := f.ReadAt(buf[:readSize], pos); err != nil && !errors.Is(err, io.EOF) {
			return 0
		}
		for i := readSize - 1; i >= 0; i-- {
			if buf[i] != '\n' {
				skipLast = false
				continue
			}
			if skipLast && pos+i == size-1 {
				skipLast = false
				continue
			}
			lines++
			if lines == n {
				return pos + i + 1
			}
		}
	}
	return 0
}
