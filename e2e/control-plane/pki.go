package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// A certificate authority made for one cluster at `up`: every certificate
// of the cluster is signed by it, and nothing outside DIR trusts it.
type authority struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// identity is a client certificate's subject: Kubernetes reads the user
// from the common name and the groups from the organizations.
type identity struct {
	file   string
	user   string
	groups []string
}

// The clients of the API server, each with the identity RBAC (or the Node
// authorizer, for the node) knows it by.
var (
	adminIdentity     = identity{"admin", "kubernetes-admin", []string{"system:masters"}}
	managerIdentity   = identity{"kube-controller-manager", "system:kube-controller-manager", nil}
	schedulerIdentity = identity{"kube-scheduler", "system:kube-scheduler", nil}
	nodeIdentity      = identity{"node", "system:node:" + nodeName, []string{"system:nodes"}}
	// The API server's own identity towards the node agent (logs).
	kubeletClientIdentity = identity{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}}
)

const nodeName = "local-node"

func newAuthority(dir string) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	template := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "local-cluster-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	if err := writePair(dir, "ca", der, key); err != nil {
		return nil, err
	}
	return &authority{cert: cert, key: key}, nil
}

// issue signs a certificate for a client (clientAuth) or a server
// (serverAuth with the given addresses) and writes DIR/NAME.crt and .key.
func (ca *authority) issue(dir, name string, subject pkix.Name, ips []net.IP, dnsNames []string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	usage := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if len(ips)+len(dnsNames) > 0 {
		usage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	template := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      subject,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  usage,
		IPAddresses:  ips,
		DNSNames:     dnsNames,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca.cert, key.Public(), ca.key)
	if err != nil {
		return err
	}
	return writePair(dir, name, der, key)
}

func (ca *authority) issueClient(dir string, who identity) error {
	return ca.issue(dir, who.file, pkix.Name{CommonName: who.user, Organization: who.groups}, nil, nil)
}

func writePair(dir, name string, der []byte, key crypto.Signer) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
}

// writeServiceAccountKey writes the RSA key the API server signs
// service-account tokens with (and verifies them with its public half).
func writeServiceAccountKey(dir string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	publicDER, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: publicDER}), 0o644)
}

// writeKubeconfig writes a kubeconfig for one client identity, with the
// certificates inlined so the file works from any directory.
func writeKubeconfig(path, pki, server string, who identity) error {
	read := func(name string) ([]byte, error) { return os.ReadFile(filepath.Join(pki, name)) }
	caData, err := read("ca.crt")
	if err != nil {
		return err
	}
	certData, err := read(who.file + ".crt")
	if err != nil {
		return err
	}
	keyData, err := read(who.file + ".key")
	if err != nil {
		return err
	}
	config := clientcmdapi.NewConfig()
	config.Clusters["local"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caData}
	config.AuthInfos[who.user] = &clientcmdapi.AuthInfo{ClientCertificateData: certData, ClientKeyData: keyData}
	config.Contexts["local"] = &clientcmdapi.Context{Cluster: "local", AuthInfo: who.user, Namespace: "default"}
	config.CurrentContext = "local"
	return clientcmd.WriteToFile(*config, path)
}

// makePKI writes every certificate and key the cluster uses into dir.
func makePKI(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	ca, err := newAuthority(dir)
	if err != nil {
		return fmt.Errorf("certificate authority: %w", err)
	}
	loopback := []net.IP{net.ParseIP("127.0.0.1")}
	apiServerIPs := append(loopback, net.ParseIP(serviceIP))
	apiServerNames := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	if err := ca.issue(dir, "apiserver", pkix.Name{CommonName: "kube-apiserver"}, apiServerIPs, apiServerNames); err != nil {
		return fmt.Errorf("API server certificate: %w", err)
	}
	if err := ca.issue(dir, "kubelet", pkix.Name{CommonName: nodeName}, loopback, []string{"localhost", nodeName}); err != nil {
		return fmt.Errorf("node certificate: %w", err)
	}
	for _, who := range []identity{adminIdentity, managerIdentity, schedulerIdentity, nodeIdentity, kubeletClientIdentity} {
		if err := ca.issueClient(dir, who); err != nil {
			return fmt.Errorf("client certificate for %s: %w", who.user, err)
		}
	}
	return writeServiceAccountKey(dir)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(err)
	}
	return n
}
