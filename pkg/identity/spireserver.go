package identity

import (
	"context"
	"errors"
	"fmt"

	entryv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/entry/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// SPIREServer deletes registration entries through the SPIRE Server API on the server's local
// admin socket (the kill path's revoke step).
type SPIREServer struct {
	conn   *grpc.ClientConn
	client entryv1.EntryClient
}

// DialSPIREServer returns a client of the server socket at path; it connects when first used.
func DialSPIREServer(path string) (*SPIREServer, error) {
	conn, err := dialLocal(path)
	if err != nil {
		return nil, fmt.Errorf("SPIRE server socket %s: %w", path, err)
	}
	return &SPIREServer{conn: conn, client: entryv1.NewEntryClient(conn)}, nil
}

// Close closes the connection.
func (s *SPIREServer) Close() error { return s.conn.Close() }

// DeleteEntries deletes every registration entry whose SPIFFE ID is id and returns how many.
func (s *SPIREServer) DeleteEntries(ctx context.Context, id string) (int, error) {
	td, path, err := Split(id)
	if err != nil {
		return 0, err
	}
	if path == "" {
		return 0, fmt.Errorf("SPIFFE ID %q has no path", id)
	}
	var ids []string
	token := ""
	for {
		resp, err := s.client.ListEntries(ctx, &entryv1.ListEntriesRequest{
			Filter:    &entryv1.ListEntriesRequest_Filter{BySpiffeId: &types.SPIFFEID{TrustDomain: td, Path: path}},
			PageToken: token,
		})
		if err != nil {
			return 0, errors.New(explain(err))
		}
		for _, e := range resp.GetEntries() {
			ids = append(ids, e.GetId())
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	if len(ids) == 0 {
		return 0, nil
	}
	resp, err := s.client.BatchDeleteEntry(ctx, &entryv1.BatchDeleteEntryRequest{Ids: ids})
	if err != nil {
		return 0, errors.New(explain(err))
	}
	n := 0
	var errs []error
	for _, r := range resp.GetResults() {
		switch codes.Code(r.GetStatus().GetCode()) {
		case codes.OK, codes.NotFound:
			n++
		default:
			errs = append(errs, fmt.Errorf("entry %s: %s", r.GetId(), r.GetStatus().GetMessage()))
		}
	}
	return n, errors.Join(errs...)
}
