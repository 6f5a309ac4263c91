package policy

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"

	"github.com/tether-sh/tether/pkg/grants"
)

// asValue is the document as a policy value.
func asValue(t testing.TB, doc string) ast.Value {
	t.Helper()
	v, err := ast.ParseTerm(doc)
	if err != nil {
		t.Fatal(err)
	}
	return v.Value
}

func strictJSON(doc string) (grants.Grants, error) {
	var g grants.Grants
	d := json.NewDecoder(bytes.NewReader([]byte(doc)))
	d.DisallowUnknownFields()
	err := d.Decode(&g)
	return g, err
}

// TestDecodeGrantsMatchesJSON: decodeGrants accepts what the strict JSON decoder accepts, with the
// same result, and refuses what it refuses (field names here are in the right case; decodeGrants
// does not accept "Mode" as encoding/json does).
func TestDecodeGrantsMatchesJSON(t *testing.T) {
	docs := []string{
		`{}`,
		`{"mode": "audit", "egress": [], "exec": [], "unix": []}`,
		`{"mode": "enforce", "egress": [{"cidr": "10.0.0.0/8", "ports": [443, "8000-8100", "22"], "protocol": "tcp", "binary": "/usr/bin/git", "audit": true}, {"cidrs": ["192.0.2.0/24"], "approval": "a1", "max_duration": "30m"}],
		  "exec": [{"path": "/usr/bin/git"}, {"path": "/opt/*", "audit": true}, {"path": "/opt/t", "sha256": "ab"}], "unix": [{"path": "@bus"}], "valid_until": "2026-11-27T18:00:00Z",
		  "listen": [{"ports": [8080, "9000-9100"], "protocol": "tcp", "audit": true}]}`,
		`{"egress": [{"cidrs": ["10.0.0.0/8", "::1"], "ports": null}, {"cidrs": []}, {"fqdn": "example.com"}, null]}`,
		`{"egress": null, "exec": null, "unix": null, "valid_until": null, "mode": null, "exec_deny": null}`,
		`{"exec_deny": ["/usr/bin/curl", "/opt/*"], "exec": []}`,
		// refused
		`{"egresss": []}`,
		`{"egress": [{"cidr": "10.0.0.0/8", "port": [443]}]}`,
		`{"egress": [{"ports": [65536]}]}`,
		`{"egress": [{"ports": [-1]}]}`,
		`{"egress": [{"ports": ["9-1"]}]}`,
		`{"egress": [{"ports": [true]}]}`,
		`{"egress": [{"cidrs": "10.0.0.0/8"}]}`,
		`{"egress": {"cidr": "10.0.0.0/8"}}`,
		`{"exec": [{"path": 7}]}`,
		`{"egress": [{"cidr": "10.0.0.0/8", "max_duration": 30}]}`,
		`{"exec_deny": [{"path": "/usr/bin/curl"}]}`,
		`{"unix": [{"path": "/x", "audit": "yes"}]}`,
		`{"mode": ["enforce"]}`,
		`{"valid_until": "tomorrow"}`,
		`{"valid_until": 5}`,
		`"everything"`,
		`[]`,
	}
	for _, doc := range docs {
		want, wantErr := strictJSON(doc)
		got, err := decodeGrants(asValue(t, doc))
		if (err != nil) != (wantErr != nil) {
			t.Errorf("%s:\ndecodeGrants error %v, JSON error %v", doc, err, wantErr)
			continue
		}
		if err == nil && !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\ndecodeGrants %+v\nJSON      %+v", doc, got, want)
		}
	}
	if _, err := decodeGrants(asValue(t, `{"egress": [{"cidr": "10.0.0.0/8", "port": [443]}]}`)); err == nil || !strings.Contains(err.Error(), "grants.egress[0].port: unknown field") {
		t.Errorf("unknown field: %v", err)
	}
}

func BenchmarkDecodeGrants(b *testing.B) {
	var rules []string
	for range 1000 {
		rules = append(rules, `{"cidr": "10.1.2.3/32", "ports": [443], "protocol": "tcp"}`)
	}
	doc := `{"mode": "enforce", "egress": [` + strings.Join(rules, ",") + `]}`
	v := asValue(b, doc)
	b.Run("decodeGrants", func(b *testing.B) {
		for b.Loop() {
			if _, err := decodeGrants(v); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Go values and a JSON round trip (baseline)", func(b *testing.B) {
		for b.Loop() {
			native, err := ast.JSON(v)
			if err != nil {
				b.Fatal(err)
			}
			raw, _ := json.Marshal(native)
			if _, err := strictJSON(string(raw)); err != nil {
				b.Fatal(err)
			}
		}
	})
}
