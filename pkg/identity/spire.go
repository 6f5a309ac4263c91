package identity

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/tether-sh/tether/pkg/panics"
)

// SPIRE asks a SPIRE Agent, through its Delegated Identity API (on the agent's admin socket),
// which SPIFFE ID SPIRE issues a process. The agent attests the process by PID itself; it
// answers tetherd only if tetherd's own SPIFFE ID is among its authorized_delegates.
type SPIRE struct {
	conn   *grpc.ClientConn
	client delegatedidentityv1.DelegatedIdentityClient
	// Retry is the wait before asking again after SPIRE did not answer. It does not grow: the
	// connection's own reconnects already back off (gRPC's backoff, at most LocalReconnect apart),
	// and a growing wait here would only add to how long an agent stays without its identity
	// after SPIRE comes back.
	Retry time.Duration
}

// DialSPIRE returns a client of the admin socket at path. It does not connect yet: a SPIRE
// agent that is not up is reported by Watch, for each process asked about, until it answers.
func DialSPIRE(path string) (*SPIRE, error) {
	conn, err := dialLocal(path)
	if err != nil {
		return nil, fmt.Errorf("SPIRE agent admin socket %s: %w", path, err)
	}
	return &SPIRE{conn: conn, client: delegatedidentityv1.NewDelegatedIdentityClient(conn), Retry: time.Second}, nil
}

// LocalReconnect is the longest wait between two attempts to reconnect to a SPIRE socket.
// gRPC's default grows to 120 s, so after a SPIRE outage of a minute an agent that appeared
// during it would wait up to half a minute more for its identity, and a kill's revoke would fail
// fast all that while; a local socket costs nothing to try again.
const LocalReconnect = 2 * time.Second

// dialLocal is a gRPC client of the unix socket at path, without transport security (the socket's
// peer is checked by SPIRE itself), reconnecting at most LocalReconnect apart.
func dialLocal(path string) (*grpc.ClientConn, error) {
	bo := backoff.DefaultConfig
	bo.MaxDelay = LocalReconnect
	return grpc.NewClient("unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: 5 * time.Second}))
}

// Close closes the connection.
func (s *SPIRE) Close() error { return s.conn.Close() }

// SVIDUpdate is what SPIRE says of a process's identity now.
type SVIDUpdate struct {
	// ID is the SPIFFE ID of the X.509-SVID SPIRE issues the process; "" when it issues none.
	ID        string
	ExpiresAt time.Time
	// Lost: SPIRE issues the process no SVID (no registration entry selects it, or its entry
	// was deleted), or more than one with different IDs. The process has no identity.
	Lost bool
	// Err: SPIRE could not be asked (unreachable, or tetherd is not an authorized delegate).
	// What was said before still stands; asking again follows.
	Err    error
	Reason string
}

// Watch follows the identity SPIRE issues pid until ctx ends: an update when it is first known,
// when the SPIFFE ID changes, when it is lost, and when SPIRE cannot be asked. Rotations of the
// same ID (a new certificate) are not reported.
func (s *SPIRE) Watch(ctx context.Context, pid int) <-chan SVIDUpdate {
	out := make(chan SVIDUpdate, 4)
	go func() {
		defer close(out)
		var last SVIDUpdate
		have := false
		send := func(u SVIDUpdate) bool {
			if u.Err == nil && have && u.ID == last.ID && u.Lost == last.Lost {
				return true
			}
			if u.Err == nil {
				last, have = u, true
			}
			select {
			case out <- u:
				return true
			case <-ctx.Done():
				return false
			}
		}
		for ctx.Err() == nil {
			err := s.follow(ctx, pid, send)
			if ctx.Err() != nil {
				return
			}
			if !send(SVIDUpdate{Err: err, Reason: explain(err)}) {
				return
			}
			select {
			case <-time.After(s.Retry):
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// follow reads one subscription until it ends.
func (s *SPIRE) follow(ctx context.Context, pid int, send func(SVIDUpdate) bool) error {
	stream, err := s.client.SubscribeToX509SVIDs(ctx, &delegatedidentityv1.SubscribeToX509SVIDsRequest{Pid: int32(pid)})
	if err != nil {
		return err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		if !send(decodeSVIDsGuarded(pid, resp.GetX509Svids())) {
			return ctx.Err()
		}
	}
}

// BoundarySPIRE counts the SPIRE responses whose decoding panicked (see panics).
var BoundarySPIRE = panics.Declare("spire response")

// decodeSVIDsGuarded is decodeSVIDs with a panic taken as an answer that names no valid identity:
// the process's identity is lost (the agent is denied), counted, and said why.
func decodeSVIDsGuarded(pid int, svids []*delegatedidentityv1.X509SVIDWithKey) (u SVIDUpdate) {
	defer func() {
		if v := recover(); v != nil {
			u = SVIDUpdate{Lost: true, Reason: fmt.Sprintf("SPIRE's answer for process %d could not be read: %v", pid, panics.Record(BoundarySPIRE, v))}
		}
	}()
	return decodeSVIDs(pid, svids)
}

func decodeSVIDs(pid int, svids []*delegatedidentityv1.X509SVIDWithKey) SVIDUpdate {
	var ids []string
	var expires time.Time
	for _, s := range svids {
		id := s.GetX509Svid().GetId()
		full, err := Parse("spiffe://" + id.GetTrustDomain() + id.GetPath())
		if err != nil {
			return SVIDUpdate{Lost: true, Reason: fmt.Sprintf("SPIRE issued process %d an SVID with an invalid ID: %v", pid, err)}
		}
		if !slices.Contains(ids, full) {
			ids = append(ids, full)
		}
		if e := time.Unix(s.GetX509Svid().GetExpiresAt(), 0); expires.IsZero() || e.Before(expires) {
			expires = e
		}
	}
	switch len(ids) {
	case 0:
		return SVIDUpdate{Lost: true, Reason: fmt.Sprintf("SPIRE issues process %d no SVID: no registration entry selects it (or its entry was deleted)", pid)}
	case 1:
		return SVIDUpdate{ID: ids[0], ExpiresAt: expires}
	default:
		return SVIDUpdate{Lost: true, Reason: fmt.Sprintf("SPIRE issues process %d SVIDs of %d identities (%s): tether binds one; make one registration entry select it", pid, len(ids), strings.Join(ids, ", "))}
	}
}

func explain(err error) string {
	switch status.Code(err) {
	case codes.Unavailable:
		return fmt.Sprintf("SPIRE agent unreachable: %v", err)
	case codes.PermissionDenied:
		return fmt.Sprintf("SPIRE agent refused tetherd (is tetherd's SPIFFE ID in the agent's authorized_delegates, and does an entry select tetherd?): %v", err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return "SPIRE agent did not answer in time"
	}
	return fmt.Sprintf("asking the SPIRE agent: %v", err)
}

// Self follows tetherd's own X.509-SVID from the SPIFFE Workload API (go-spiffe) at socket,
// until ctx ends; update gets its SPIFFE ID and expiry, or the error that keeps it from one.
// The SPIRE agent checks that ID against its authorized_delegates before it answers Watch.
func Self(ctx context.Context, socket string, update func(id string, expires time.Time, err error)) {
	w := selfWatcher(update)
	for ctx.Err() == nil {
		err := workloadapi.WatchX509Context(ctx, w, workloadapi.WithAddr("unix://"+socket))
		if ctx.Err() != nil {
			return
		}
		update("", time.Time{}, fmt.Errorf("SPIFFE Workload API at %s: %w", socket, err))
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
		}
	}
}

type selfWatcher func(id string, expires time.Time, err error)

func (f selfWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	s := c.DefaultSVID()
	if s == nil {
		f("", time.Time{}, errors.New("the SPIFFE Workload API issued tetherd no SVID: register an entry that selects tetherd"))
		return
	}
	f(s.ID.String(), s.Certificates[0].NotAfter, nil)
}

func (f selfWatcher) OnX509ContextWatchError(err error) {
	if status.Code(err) == codes.PermissionDenied {
		f("", time.Time{}, errors.New("the SPIFFE Workload API issued tetherd no SVID: register an entry that selects tetherd"))
		return
	}
	f("", time.Time{}, fmt.Errorf("SPIFFE Workload API: %w", err))
}

// FetchJWTSVID asks SPIRE for a JWT-SVID for the process pid with audience: its token, SPIFFE
// ID and expiry. More than one identity for the process is refused, as in Watch.
func (s *SPIRE) FetchJWTSVID(ctx context.Context, pid int, audience string) (string, string, time.Time, error) {
	resp, err := s.client.FetchJWTSVIDs(ctx, &delegatedidentityv1.FetchJWTSVIDsRequest{Audience: []string{audience}, Pid: int32(pid)})
	if err != nil {
		return "", "", time.Time{}, errors.New(explain(err))
	}
	svids := resp.GetSvids()
	if len(svids) != 1 {
		return "", "", time.Time{}, fmt.Errorf("SPIRE issued process %d %d JWT-SVIDs, want one", pid, len(svids))
	}
	id, err := Parse("spiffe://" + svids[0].GetId().GetTrustDomain() + svids[0].GetId().GetPath())
	if err != nil {
		return "", "", time.Time{}, err
	}
	return svids[0].GetToken(), id, time.Unix(svids[0].GetExpiresAt(), 0), nil
}
