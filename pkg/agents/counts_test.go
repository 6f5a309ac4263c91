package agents

import (
	"encoding/json"
	"testing"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestCountsJSON: an agent's decision counts are typed in Go and {"kind/verdict": n} in JSON, as
// the API has always written them; what is written reads back the same, and a key that is no
// kind and verdict is an error.
func TestCountsJSON(t *testing.T) {
	c := Counts{{dataplane.KindConnect4, dataplane.VerdictDeny}: 2, {dataplane.KindExec, dataplane.VerdictAudit}: 1}
	b, err := json.Marshal(c)
	if err != nil || string(b) != `{"connect4/deny":2,"exec/audit-deny":1}` {
		t.Fatalf("%s %v", b, err)
	}
	var back Counts
	if err := json.Unmarshal(b, &back); err != nil || len(back) != 2 || back[CountKey{dataplane.KindExec, dataplane.VerdictAudit}] != 1 {
		t.Errorf("read back: %v %v", back, err)
	}
	if err := json.Unmarshal([]byte(`{"connect9/deny":1}`), &back); err == nil {
		t.Error("an unknown kind was read")
	}
}
