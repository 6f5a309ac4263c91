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

func TestMatch(t *testing.T) {
	if !Match("spiffe://x.org/agents/*", "spiffe://x.org/agents/a") || Match("spiffe://x.org/agents/*", "spiffe://x.org/agents/a/b") || Match("spiffe://x.org/agents/*", "spiffe://y.org/agents/a") {
		t.Error("pattern matching")
	}
	if ValidPattern("spiffe://x.org/[") == nil {
		t.Error("bad pattern accepted")
	}
}
