package grants

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// asValue is what OPA hands over for a JSON document: decoded with numbers kept as json.Number.
func asValue(t testing.TB, doc string) any {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(doc))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

func strictJSON(doc string) (Grants, error) {
	var g Grants
	d := json.NewDecoder(bytes.NewReader([]byte(doc)))
	d.DisallowUnknownFields()
	err := d.Decode(&g)
	return g, err
}

// TestFromValueMatchesJSON: FromValue accepts what the strict JSON decoder accepts, with the
// same result, and refuses what it refuses (field names here are in the right case; FromValue
// does not accept "Mode" as encoding/json does).
func TestFromValueMatchesJSON(t *testing.T) {
	docs := []string{
		`{}`,
		`{"mode": "audit", "egress": [], "exec": [], "unix": []}`,
		`{"mode": "enforce", "egress": [{"cidr": "10.0.0.0/8", "ports": [443, "8000-8100", "22"], "protocol": "tcp", "binary": "/usr/bin/git", "audit": true}],
		  "exec": [{"path": "/usr/bin/git"}, {"path": "/opt/*", "audit": true}], "unix": [{"path": "@bus"}], "valid_until": "2026-11-27T18:00:00Z"}`,
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
		got, err := FromValue(asValue(t, doc))
		if (err != nil) != (wantErr != nil) {
			t.Errorf("%s:\nFromValue error %v, JSON error %v", doc, err, wantErr)
			continue
		}
		if err == nil && !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\nFromValue %+v\nJSON      %+v", doc, got, want)
		}
	}
	if _, err := FromValue(asValue(t, `{"egress": [{"cidr": "10.0.0.0/8", "port": [443]}]}`)); err == nil || !strings.Contains(err.Error(), "grants.egress[0].port: unknown field") {
		t.Errorf("unknown field: %v", err)
	}
}

func BenchmarkFromValue(b *testing.B) {
	var rules []string
	for range 1000 {
		rules = append(rules, `{"cidr": "10.1.2.3/32", "ports": [443], "protocol": "tcp"}`)
	}
	doc := `{"mode": "enforce", "egress": [` + strings.Join(rules, ",") + `]}`
	v := asValue(b, doc)
	b.Run("FromValue", func(b *testing.B) {
		for b.Loop() {
			if _, err := FromValue(v); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("JSON round trip (baseline)", func(b *testing.B) {
		for b.Loop() {
			raw, _ := json.Marshal(v)
			if _, err := strictJSON(string(raw)); err != nil {
				b.Fatal(err)
			}
		}
	})
}
