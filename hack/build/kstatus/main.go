// kstatus: kstatus's verdict on one Kubernetes object, for the tests of the TrainingJob
// conditions (docs/CONTRACTS.md, "Conditions and kstatus"). Reads the object as JSON on stdin
// and prints {"status": ..., "message": ...} from sigs.k8s.io/cli-utils' status.Compute, the
// function Flux and other kstatus users call.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("reading stdin: %v", err)
	}
	// Unstructured's own decoder keeps integers as int64, which status.Compute needs for
	// metadata.generation and status.observedGeneration.
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(raw); err != nil {
		fail("stdin is not a Kubernetes object: %v", err)
	}
	res, err := status.Compute(obj)
	if err != nil {
		fail("status.Compute: %v", err)
	}
	out := map[string]string{"status": res.Status.String(), "message": res.Message}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("writing stdout: %v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kstatus: "+format+"\n", args...)
	os.Exit(1)
}
