// The Kubeflow Spark operator at the version the e2e tests simulate: its
// module holds the SparkApplication CRD (config/crd/bases/), which
// `e2e/local-cluster install-spark-operator-crd` fetches with
// `go mod download` (verified against go.sum) and installs. Nothing here
// is built: the module only pins the version and its checksum.
module segment-operator.dev/spark-operator

go 1.26.0

require github.com/kubeflow/spark-operator/v2 v2.3.0
