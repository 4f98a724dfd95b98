package nodeagent

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func TestExpandVars(t *testing.T) {
	vars := map[string]string{"A": "alpha", "B": "beta", "EMPTY": ""}
	for in, want := range map[string]string{
		"plain":            "plain",
		"$(A)":             "alpha",
		"x-$(A)-$(B)-y":    "x-alpha-beta-y",
		"$(UNDEFINED)":     "$(UNDEFINED)",
		"$$(A)":            "$(A)",
		"$$$(A)":           "$alpha",
		"$$":               "$",
		"cost: $5":         "cost: $5",
		"trailing $":       "trailing $",
		"$(A":              "$(A",
		"$(A $(B)":         "$(A $(B)",
		"$()":              "$()",
		"[$(EMPTY)]":       "[]",
		"$A ${A}":          "$A ${A}",
		"$($(A))":          "$($(A))",
		"nested $(A)$(A)x": "nested alphaalphax",
	} {
		if got := expandVars(in, mapLookup(vars)); got != want {
			t.Errorf("expandVars(%q) = %q, want %q", in, got, want)
		}
	}
}

func envTestPod() *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "job-abc", Namespace: "ns1", UID: "uid-1",
			Labels:      map[string]string{"app": "worker", "tier": "batch"},
			Annotations: map[string]string{"note": "hello"},
		},
		Spec: corev1.PodSpec{NodeName: "local-node", ServiceAccountName: "runner"},
	}
}

func resolveForTest(t *testing.T, pod *corev1.Pod, c *corev1.Container, objs ...runtimeObject) (resolvedEnv, error) {
	t.Helper()
	client := fake.NewClientset(objs...)
	getter := clientGetter{client: client, timeout: func(ctx context.Context) (context.Context, context.CancelFunc) {
		return context.WithTimeout(ctx, 5*time.Second)
	}}
	return resolveEnv(context.Background(), envContext{
		pod: pod, container: c,
		allocatable: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("2"), corev1.ResourceMemory: resource.MustParse("8Gi")},
		serviceEnv:  map[string]string{"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"},
		defaultPath: "/usr/bin:/bin",
		objects:     getter,
	})
}

func envMap(list []string) map[string]string {
	m := map[string]string{}
	for _, kv := range list {
		k, v, _ := strings.Cut(kv, "=")
		if _, dup := m[k]; dup {
			m[k] = "DUPLICATE IN LIST"
			continue
		}
		m[k] = v
	}
	return m
}

func TestResolveEnvExpansionAndDuplicates(t *testing.T) {
	pod := envTestPod()
	c := &corev1.Container{
		Name: "main",
		EnvFrom: []corev1.EnvFromSource{
			{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "settings"}}},
			{Prefix: "S_", SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}}},
		},
		Env: []corev1.EnvVar{
			{Name: "GREETING", Value: "hello"},
			{Name: "MESSAGE", Value: "$(GREETING) world, mode=$(MODE)"}, // MODE from envFrom
			{Name: "GREETING", Value: "bye"},                            // duplicate: the last wins
			{Name: "LATER", Value: "$(GREETING)/$(NOT_DEFINED)/$$(GREETING)"},
			{Name: "MODE", Value: "override"}, // env overrides envFrom
			{Name: "API", Value: "https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"},
			{Name: "SELF", Value: "$(SELF)x"},
		},
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "settings", Namespace: "ns1"}, Data: map[string]string{"MODE": "fast", "LEVEL": "3", "bad=key": "skipped"}}
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "creds", Namespace: "ns1"}, Data: map[string][]byte{"TOKEN": []byte("s3cret")}}
	env, err := resolveForTest(t, pod, c, cm, sec)
	if err != nil {
		t.Fatal(err)
	}
	got := envMap(env.list)
	want := map[string]string{
		"GREETING":                "bye",
		"MESSAGE":                 "hello world, mode=fast",
		"LATER":                   "bye/$(NOT_DEFINED)/$(GREETING)",
		"MODE":                    "override",
		"LEVEL":                   "3",
		"S_TOKEN":                 "s3cret",
		"API":                     "https://127.0.0.1:6443",
		"SELF":                    "$(SELF)x",
		"HOSTNAME":                "job-abc",
		"PATH":                    "/usr/bin:/bin",
		"KUBERNETES_SERVICE_HOST": "127.0.0.1",
		"KUBERNETES_SERVICE_PORT": "6443",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("env has %d entries, want %d: %v", len(got), len(want), env.list)
	}
	if env.vars["GREETING"] != "bye" {
		t.Errorf("vars for command expansion: GREETING = %q", env.vars["GREETING"])
	}
}

func TestResolveEnvUserPathAndHostname(t *testing.T) {
	pod := envTestPod()
	pod.Spec.Hostname = "custom-host"
	c := &corev1.Container{Name: "main", Env: []corev1.EnvVar{{Name: "PATH", Value: "/opt/bin"}}}
	env, err := resolveForTest(t, pod, c)
	if err != nil {
		t.Fatal(err)
	}
	got := envMap(env.list)
	if got["PATH"] != "/opt/bin" || got["HOSTNAME"] != "custom-host" {
		t.Fatalf("PATH=%q HOSTNAME=%q", got["PATH"], got["HOSTNAME"])
	}
}

func TestResolveEnvDownwardAPIAndResources(t *testing.T) {
	pod := envTestPod()
	c := &corev1.Container{
		Name: "main",
		Resources: corev1.ResourceRequirements{
			Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("250m")},
		},
		Env: []corev1.EnvVar{
			{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
			{Name: "POD_NS", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
			{Name: "POD_UID", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.uid"}}},
			{Name: "APP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels['app']"}}},
			{Name: "NOTE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.annotations['note']"}}},
			{Name: "MISSING_LABEL", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels['nope']"}}},
			{Name: "NODE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}},
			{Name: "SA", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.serviceAccountName"}}},
			{Name: "HOST_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.hostIP"}}},
			{Name: "POD_IPS", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIPs"}}},
			{Name: "MEM_LIMIT_MI", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory", Divisor: resource.MustParse("1Mi")}}},
			{Name: "MEM_LIMIT", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory"}}},
			{Name: "CPU_LIMIT", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.cpu"}}},
			{Name: "CPU_REQ", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "requests.cpu"}}},
			{Name: "CPU_REQ_M", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "requests.cpu", Divisor: resource.MustParse("1m")}}},
			{Name: "USES", Value: "$(POD_NAME).$(POD_NS)"},
		},
	}
	env, err := resolveForTest(t, pod, c)
	if err != nil {
		t.Fatal(err)
	}
	got := envMap(env.list)
	for k, v := range map[string]string{
		"POD_NAME": "job-abc", "POD_NS": "ns1", "POD_UID": "uid-1", "APP": "worker", "NOTE": "hello",
		"MISSING_LABEL": "", "NODE": "local-node", "SA": "runner", "HOST_IP": "127.0.0.1", "POD_IPS": "127.0.0.1",
		"MEM_LIMIT_MI": "64", "MEM_LIMIT": "67108864", "CPU_LIMIT": "2", "CPU_REQ": "1", "CPU_REQ_M": "250",
		"USES": "job-abc.ns1",
	} {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
}

func TestResolveEnvMissingReferences(t *testing.T) {
	pod := envTestPod()
	yes := true
	cases := []struct {
		name    string
		env     []corev1.EnvVar
		envFrom []corev1.EnvFromSource
		objs    []runtimeObject
		wantErr string
		absent  string
	}{
		{
			name:    "missing secret",
			env:     []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "db"}, Key: "password"}}}},
			wantErr: `secret "db" not found`,
		},
		{
			name:    "missing configmap",
			env:     []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}, Key: "k"}}}},
			wantErr: `configmap "cfg" not found`,
		},
		{
			name:    "missing key",
			env:     []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "db"}, Key: "password"}}}},
			objs:    []runtimeObject{&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: "ns1"}, Data: map[string][]byte{"user": []byte("u")}}},
			wantErr: "couldn't find key password in Secret ns1/db",
		},
		{
			name:    "missing envFrom secret",
			envFrom: []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "all"}}}},
			wantErr: `secret "all" not found`,
		},
		{
			name:   "optional secret",
			env:    []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "db"}, Key: "password", Optional: &yes}}}},
			absent: "X",
		},
		{
			name:   "optional key",
			env:    []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}, Key: "k", Optional: &yes}}}},
			objs:   []runtimeObject{&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cfg", Namespace: "ns1"}}},
			absent: "X",
		},
		{
			name:    "optional envFrom configmap",
			envFrom: []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "nope"}, Optional: &yes}}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env, err := resolveForTest(t, pod, &corev1.Container{Name: "main", Env: tc.env, EnvFrom: tc.envFrom}, tc.objs...)
			if tc.wantErr != "" {
				if _, ok := err.(*configError); !ok || err.Error() != tc.wantErr {
					t.Fatalf("err = %v (%T), want configError %q", err, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if _, set := envMap(env.list)[tc.absent]; tc.absent != "" && set {
				t.Fatalf("%s is set", tc.absent)
			}
		})
	}
}

func TestContainerArgv(t *testing.T) {
	img := imageEntry{Entrypoint: []string{"/bin/app", "--base"}, Cmd: []string{"--default"}}
	vars := map[string]string{"N": "3"}
	for _, tc := range []struct {
		command, args, want []string
	}{
		{nil, nil, []string{"/bin/app", "--base", "--default"}},
		{nil, []string{"--n=$(N)"}, []string{"/bin/app", "--base", "--n=3"}},
		{[]string{"/bin/other"}, nil, []string{"/bin/other"}},
		{[]string{"/bin/other", "$(N)"}, []string{"$$(N)", "$(M)"}, []string{"/bin/other", "3", "$(N)", "$(M)"}},
	} {
		got := containerArgv(&corev1.Container{Command: tc.command, Args: tc.args}, img, vars)
		if strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("command %v args %v: got %v, want %v", tc.command, tc.args, got, tc.want)
		}
	}
}

func TestFormatMapAndSubscript(t *testing.T) {
	if got := formatMap(map[string]string{"b": "2", "a": `say "hi"`}); got != "a=\"say \\\"hi\\\"\"\nb=\"2\"" {
		t.Errorf("formatMap = %q", got)
	}
	if b, k, ok := parseSubscript("metadata.labels['app.kubernetes.io/name']"); !ok || b != "metadata.labels" || k != "app.kubernetes.io/name" {
		t.Errorf("parseSubscript = %q %q %v", b, k, ok)
	}
}

func TestSecurityFor(t *testing.T) {
	yes, no := true, false
	root, user := int64(0), int64(1000)
	pod := envTestPod()
	pod.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsNonRoot: &yes, FSGroup: &user, SupplementalGroups: []int64{5, 1000}}
	s, err := securityFor(pod, &corev1.Container{Name: "c", SecurityContext: &corev1.SecurityContext{AllowPrivilegeEscalation: &no, ReadOnlyRootFilesystem: &yes}})
	if err != nil {
		t.Fatal(err)
	}
	if s.uid == nil || *s.uid != 65532 || s.gid != 65532 || !s.noNewPrivs || !s.readOnlyRoot || len(s.groups) != 2 {
		t.Fatalf("settings %+v uid %v", s, s.uid)
	}
	if _, err := securityFor(pod, &corev1.Container{Name: "c", SecurityContext: &corev1.SecurityContext{RunAsUser: &root}}); err == nil || !strings.Contains(err.Error(), "breaks non-root policy") {
		t.Fatalf("runAsNonRoot with uid 0: err %v", err)
	}
	pod.Spec.SecurityContext = nil
	s, _ = securityFor(pod, &corev1.Container{Name: "c"})
	if s.uid != nil {
		t.Fatalf("no securityContext should keep the agent's user, got uid %d", *s.uid)
	}
}
