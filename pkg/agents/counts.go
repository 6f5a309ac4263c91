package agents

import (
	"fmt"
	"strings"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// Counts are an agent's kernel decisions by kind and verdict, as the kernel counted them. Its JSON
// is an object {"kind/verdict": n} ("connect4/deny").
type Counts map[CountKey]uint64

// CountKey is a kind of decision and its verdict.
type CountKey struct {
	Kind    dataplane.Kind
	Verdict dataplane.Verdict
}

// MarshalText is "kind/verdict".
func (k CountKey) MarshalText() ([]byte, error) {
	return []byte(k.Kind.String() + "/" + k.Verdict.String()), nil
}

// UnmarshalText reads "kind/verdict".
func (k *CountKey) UnmarshalText(b []byte) error {
	kind, verdict, _ := strings.Cut(string(b), "/")
	for i := range dataplane.NumKinds {
		for v := range dataplane.NumVerdicts {
			if dataplane.Kind(i).String() == kind && dataplane.Verdict(v).String() == verdict {
				*k = CountKey{dataplane.Kind(i), dataplane.Verdict(v)}
				return nil
			}
		}
	}
	return fmt.Errorf("decision count %q: want kind/verdict", b)
}
