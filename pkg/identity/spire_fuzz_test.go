package identity

import (
	"testing"

	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	typesv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/protobuf/proto"

	"github.com/tether-sh/tether/pkg/panics"
)

// FuzzDecodeSVIDs: whatever the SPIRE Agent answers on the Delegated Identity API (the response
// as it comes off the wire, then its fields), tetherd reads an identity, or a lost one with the
// reason, and never panics.
func FuzzDecodeSVIDs(f *testing.F) {
	ok, _ := proto.Marshal(&delegatedidentityv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedidentityv1.X509SVIDWithKey{
		{X509Svid: &typesv1.X509SVID{Id: &typesv1.SPIFFEID{TrustDomain: "example.org", Path: "/agent"}, ExpiresAt: 1900000000}},
	}})
	f.Add(ok, "example.org", "/agent", int64(1900000000))
	f.Add([]byte{0x0a, 0x00}, "", "", int64(0))
	f.Add([]byte{}, "a b", "//x", int64(-1))
	f.Fuzz(func(t *testing.T, wire []byte, td, path string, expires int64) {
		before := panics.Counts()[BoundarySPIRE]
		var resp delegatedidentityv1.SubscribeToX509SVIDsResponse
		if proto.Unmarshal(wire, &resp) == nil {
			check(t, decodeSVIDsGuarded(1, resp.GetX509Svids()))
		}
		check(t, decodeSVIDsGuarded(1, []*delegatedidentityv1.X509SVIDWithKey{
			{X509Svid: &typesv1.X509SVID{Id: &typesv1.SPIFFEID{TrustDomain: td, Path: path}, ExpiresAt: expires}}, nil, {},
		}))
		if got := panics.Counts()[BoundarySPIRE]; got != before {
			t.Fatalf("reading a SPIRE answer panicked")
		}
	})
}

func check(t *testing.T, u SVIDUpdate) {
	t.Helper()
	if u.Lost && u.Reason == "" {
		t.Fatalf("an identity lost without a reason: %+v", u)
	}
	if !u.Lost {
		if _, err := Parse(u.ID); err != nil {
			t.Fatalf("an identity read that is not one: %+v: %v", u, err)
		}
	}
}
