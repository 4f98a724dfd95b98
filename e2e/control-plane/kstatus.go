package main

import (
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// runKstatus prints the kstatus verdict (Current, InProgress, Failed, ...)
// of each object in a JSON document, the way Flux and other GitOps tools
// judge a resource's health:
//
//	kubectl get segment x -o json | kstatus -
//
// It reads a single object or a List (`kubectl get ... -o json`), prints
// one line per object, `<kind>/<namespace>/<name> <status> <message>`, and
// exits 0 only when every object is Current.
func runKstatus(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: kstatus FILE|-")
		return 2
	}
	var input io.Reader = os.Stdin
	if args[0] != "-" {
		file, err := os.Open(args[0])
		if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus:", err)
			return 2
		}
		defer file.Close()
		input = file
	}
	data, err := io.ReadAll(input)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: reading input:", err)
		return 2
	}
	// Kubernetes' JSON decoding keeps integers as int64, which kstatus
	// expects (encoding/json would make them float64).
	var document map[string]interface{}
	if err := utiljson.Unmarshal(data, &document); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: reading JSON:", err)
		return 2
	}
	objects := []unstructured.Unstructured{{Object: document}}
	if items, ok := document["items"].([]interface{}); ok {
		objects = objects[:0]
		for _, item := range items {
			if object, ok := item.(map[string]interface{}); ok {
				objects = append(objects, unstructured.Unstructured{Object: object})
			}
		}
	}
	allCurrent := true
	for i := range objects {
		object := &objects[i]
		result, err := status.Compute(object)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %s/%s: %v\n", object.GetKind(), object.GetName(), err)
			return 2
		}
		fmt.Printf("%s/%s/%s %s %s\n", object.GetKind(), object.GetNamespace(), object.GetName(), result.Status, result.Message)
		if result.Status != status.CurrentStatus {
			allCurrent = false
		}
	}
	if !allCurrent {
		return 1
	}
	return 0
}
