// Command local-cluster is a Kubernetes control plane for tests and for
// trying the operator on one machine, built from the Kubernetes, etcd, Helm
// and cli-utils Go modules at the versions pinned in go.mod (no release
// binary is downloaded).
//
// One binary holds every tool, so the large common packages compile once:
//
//	local-cluster up DIR         start etcd, the API server, the controller
//	                             manager, the scheduler and the node agent;
//	                             write DIR/kubeconfig and DIR/bin/
//	local-cluster down DIR       stop everything `up` started
//	local-cluster stop DIR NAME  stop one component (e.g. kube-apiserver)
//	local-cluster start DIR NAME start it again with the same arguments
//
// and, chosen by the first argument or by the name the binary is called
// under (DIR/bin/kubectl is a link to it):
//
//	etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
//	kubectl, helm, kstatus, node-agent
package main

import (
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata" // CronJob time zones in the controller manager

	"go.etcd.io/etcd/server/v3/etcdmain"
	helmcmd "helm.sh/helm/v4/pkg/cmd"
	helmkube "helm.sh/helm/v4/pkg/kube"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"

	"segment-operator.dev/local-cluster/nodeagent"
)

// tools are the programs this binary can be, by name.
var tools = map[string]func() int{
	"etcd":                    func() int { etcdmain.Main(os.Args); return 0 },
	"kube-apiserver":          func() int { return cli.Run(apiserver.NewAPIServerCommand()) },
	"kube-controller-manager": func() int { return cli.Run(controllermanager.NewControllerManagerCommand()) },
	"kube-scheduler":          func() int { return cli.Run(scheduler.NewSchedulerCommand()) },
	"kubectl":                 runKubectl,
	"helm":                    runHelm,
	"kstatus":                 func() int { return runKstatus(os.Args[1:]) },
	"node-agent":              func() int { return nodeagent.Main(os.Args[1:]) },
	"container-init":          func() int { return nodeagent.ContainerInitMain(os.Args[1:]) },
	"up":                      func() int { return runUp(os.Args[1:]) },
	"down":                    func() int { return runDown(os.Args[1:]) },
	"stop":                    func() int { return runStop(os.Args[1:]) },
	"start":                   func() int { return runStart(os.Args[1:]) },
	"watch-parent":            func() int { return runWatchParent(os.Args[1:]) },
}

func main() {
	name := filepath.Base(os.Args[0])
	// Called under its own name (a link in DIR/bin) the binary is that
	// tool; otherwise the first argument names it.
	if _, ok := tools[name]; !ok {
		if len(os.Args) < 2 || tools[os.Args[1]] == nil {
			fmt.Fprintln(os.Stderr, "usage: local-cluster up|down|stop|start|etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubectl|helm|kstatus|node-agent ...")
			os.Exit(2)
		}
		name = os.Args[1]
		// Each tool parses os.Args as if it had been called by its name
		// (kubectl looks there for plugins, etcd for its flags).
		os.Args = append([]string{name}, os.Args[2:]...)
	}
	os.Exit(tools[name]())
}

func runKubectl() int {
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
	}
	return 0
}

func runHelm() int {
	// The field manager helm's server-side applies are recorded under.
	helmkube.ManagedFieldsManager = "helm"
	command, err := helmcmd.NewRootCmd(os.Stdout, os.Args[1:], helmcmd.SetupLogging)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helm:", err)
		return 1
	}
	if err := command.Execute(); err != nil {
		if commandErr, ok := err.(helmcmd.CommandError); ok {
			return commandErr.ExitCode
		}
		return 1
	}
	return 0
}
