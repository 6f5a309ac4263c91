package identity

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	typesv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
)

// agentStub answers every subscription with one SVID of spiffe://example.org/agent. It stands
// in for the SPIRE agent in this one-stage test; test/e2e's TestFaultSPIREOutage stops and
// restarts a real one.
type agentStub struct {
	delegatedidentityv1.UnimplementedDelegatedIdentityServer
}

func (agentStub) SubscribeToX509SVIDs(_ *delegatedidentityv1.SubscribeToX509SVIDsRequest, s delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
	err := s.Send(&delegatedidentityv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedidentityv1.X509SVIDWithKey{
		{X509Svid: &typesv1.X509SVID{Id: &typesv1.SPIFFEID{TrustDomain: "example.org", Path: "/agent"}, ExpiresAt: time.Now().Add(time.Hour).Unix()}},
	}})
	if err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

// dropping is a listener that closes every connection until the outage is over: the first
// connection it closes after that is the client's attempt at which the server comes up; from then
// on it hands connections to the server.
type dropping struct {
	net.Listener
	over time.Time
	up   chan time.Time
}

func (l *dropping) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil || l.up == nil {
			return c, err
		}
		c.Close()
		if time.Now().After(l.over) {
			l.up <- time.Now()
			l.up = nil
		}
	}
}

// TestWatchReconnectsSoonAfterALongOutage: the SPIRE agent's socket drops every connection for
// 25 s, then a server comes up right after one of tetherd's attempts. gRPC's own wait before the
// next attempt has grown past 8 s by then; tetherd's is at most LocalReconnect, so the identity
// is known within it (with its jitter, a retry and a second's slack).
func TestWatchReconnectsSoonAfterALongOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("waits 25 s")
	}
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "admin.sock")
	inner, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l := &dropping{Listener: inner, over: time.Now().Add(25 * time.Second), up: make(chan time.Time, 1)}
	upAt := l.up
	srv := grpc.NewServer()
	delegatedidentityv1.RegisterDelegatedIdentityServer(srv, agentStub{})
	go srv.Serve(l)
	defer srv.Stop()
	s, err := DialSPIRE(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	updates := s.Watch(ctx, 1)
	var up time.Time
	for up.IsZero() {
		select {
		case u := <-updates:
			if u.Err == nil {
				t.Fatalf("an identity from a server that drops every connection: %+v", u)
			}
		case up = <-upAt:
		}
	}
	deadline := time.After(LocalReconnect*6/5 + s.Retry + time.Second)
	for {
		select {
		case u := <-updates:
			if u.Err == nil {
				if u.ID != "spiffe://example.org/agent" {
					t.Fatalf("identity %+v", u)
				}
				t.Logf("identity known %s after the server came up", time.Since(up).Round(time.Millisecond))
				return
			}
		case <-deadline:
			t.Fatalf("no identity %s after the server came up", time.Since(up).Round(time.Millisecond))
		}
	}
}
