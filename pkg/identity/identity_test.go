package identity

import "testing"

func TestParse(t *testing.T) {
	for in, ok := range map[string]bool{
		"spiffe://example.org/agent":     true,
		"spiffe://example.org/ns/a/sa/b": true,
		"spiffe://Example.org/agent":     false,
		"http://example.org/agent":       false,
		"spiffe://example.org/agent/":    false,
		"spiffe://example.org/a/../b":    false,
		"agent":                          false,
		"":                               false,
	} {
		if _, err := Parse(in); (err == nil) != ok {
			t.Errorf("Parse(%q): %v", in, err)
		}
	}
}

func TestSplit(t *testing.T) {
	for _, c := range []struct{ id, td, path string }{
		{"spiffe://example.org/ns/a/sa/b", "example.org", "/ns/a/sa/b"},
		{"spiffe://example.org", "example.org", ""},
	} {
		td, path, err := Split(c.id)
		if err != nil || td != c.td || path != c.path {
			t.Errorf("Split(%q) = %q, %q, %v", c.id, td, path, err)
		}
	}
	for _, bad := range []string{"example.org/a", "spiffe://Example.org/a", "spiffe://x.org/a/../b", ""} {
		if _, _, err := Split(bad); err == nil {
			t.Errorf("Split(%q): no error", bad)
		}
	}
}

func TestMatch(t *testing.T) {
	if !Match("spiffe://x.org/agents/*", "spiffe://x.org/agents/a") || Match("spiffe://x.org/agents/*", "spiffe://x.org/agents/a/b") || Match("spiffe://x.org/agents/*", "spiffe://y.org/agents/a") {
		t.Error("pattern matching")
	}
	if ValidPattern("spiffe://x.org/[") == nil {
		t.Error("bad pattern accepted")
	}
}
