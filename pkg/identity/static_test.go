package identity

import (
	"slices"
	"strings"
	"testing"

	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
)

func uid(n uint32) *uint32 { return &n }

func TestStaticResolve(t *testing.T) {
	s, err := NewStatic([]StaticRule{
		{ID: "spiffe://x.org/build", Cgroup: "agents/build-*"},
		{ID: "spiffe://x.org/unit", Unit: "agent-*.service"},
		{ID: "spiffe://x.org/user", Cgroup: "users/*", UID: uid(1000)},
		{ID: "spiffe://x.org/build", Cgroup: "agents/build-1"},  // same ID again: no conflict
		{ID: "spiffe://x.org/clash", Cgroup: "agents/build-9*"}, // another ID for build-9*: conflict
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		w    Workload
		id   string
		sel  []string
		fail string
	}{
		{Workload{Cgroup: "/agents/build-1"}, "spiffe://x.org/build", []string{"static:cgroup:agents/build-*"}, ""},
		{Workload{Cgroup: "/agents/build-1/child"}, "", nil, ""}, // a pattern matches one level
		{Workload{Cgroup: "/system.slice/agent-a.service"}, "spiffe://x.org/unit", []string{"static:unit:agent-a.service"}, ""},
		{Workload{Cgroup: "/system.slice/agent-a.scope"}, "", nil, ""},
		{Workload{Cgroup: "/users/u", UID: 1000}, "spiffe://x.org/user", []string{"static:cgroup:users/*", "static:uid:1000"}, ""},
		{Workload{Cgroup: "/users/u", UID: 1001}, "", nil, ""}, // every selector must match
		{Workload{Cgroup: "/agents/build-99"}, "", nil, "two identities"},
	}
	for _, tt := range tests {
		id, sel, err := s.Resolve(tt.w)
		if tt.fail != "" {
			if err == nil || !strings.Contains(err.Error(), tt.fail) {
				t.Errorf("%+v: error %v, want %q", tt.w, err, tt.fail)
			}
			continue
		}
		if err != nil || id != tt.id || !slices.Equal(sel, tt.sel) {
			t.Errorf("%+v: got %q %v %v, want %q %v", tt.w, id, sel, err, tt.id, tt.sel)
		}
	}
}

func TestNewStaticRefuses(t *testing.T) {
	for _, tt := range []struct {
		rule StaticRule
		want string
	}{
		{StaticRule{ID: "x.org/a", Cgroup: "a"}, "SPIFFE ID"},
		{StaticRule{ID: "spiffe://x.org/a"}, "selects nothing"},
		{StaticRule{ID: "spiffe://x.org/a", Cgroup: "a/["}, "pattern"},
	} {
		if _, err := NewStatic([]StaticRule{tt.rule}); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: %v, want %q", tt.rule, err, tt.want)
		}
	}
}

func svid(td, path string, expires int64) *delegatedidentityv1.X509SVIDWithKey {
	return &delegatedidentityv1.X509SVIDWithKey{X509Svid: &types.X509SVID{Id: &types.SPIFFEID{TrustDomain: td, Path: path}, ExpiresAt: expires}}
}

func TestDecodeSVIDs(t *testing.T) {
	if u := decodeSVIDs(7, nil); !u.Lost || !strings.Contains(u.Reason, "no SVID") {
		t.Errorf("none: %+v", u)
	}
	u := decodeSVIDs(7, []*delegatedidentityv1.X509SVIDWithKey{svid("x.org", "/a", 200), svid("x.org", "/a", 100)})
	if u.Lost || u.ID != "spiffe://x.org/a" || u.ExpiresAt.Unix() != 100 {
		t.Errorf("one ID twice: %+v", u)
	}
	if u := decodeSVIDs(7, []*delegatedidentityv1.X509SVIDWithKey{svid("x.org", "/a", 1), svid("x.org", "/b", 1)}); !u.Lost || !strings.Contains(u.Reason, "2 identities") {
		t.Errorf("two IDs: %+v", u)
	}
	if u := decodeSVIDs(7, []*delegatedidentityv1.X509SVIDWithKey{svid("X.org", "/a", 1)}); !u.Lost || !strings.Contains(u.Reason, "invalid ID") {
		t.Errorf("invalid: %+v", u)
	}
}
