package api

import (
	"encoding/json"
	"net/http"

	"github.com/tether-sh/tether/pkg/events"
)

// events streams decision records as JSON lines, from now on, until the caller goes away:
// filtered by spiffe_id and verdict. Who may read status may follow them. A reader that does not
// keep up loses records: a line {"dropped": N} says how many.
func (s *Server) events(c *request) (any, error) {
	w, r := c.w, c.r
	id, verdict := r.URL.Query().Get("spiffe_id"), r.URL.Query().Get("verdict")
	sub := s.svc.Events.Subscribe(4096)
	defer sub.Close()
	flusher, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	if flusher != nil {
		flusher.Flush()
	}
	enc := json.NewEncoder(w)
	var told uint64
	for {
		select {
		case <-r.Context().Done():
			return nil, nil
		case d := <-sub.C:
			if n := sub.Dropped(); n > told {
				enc.Encode(map[string]uint64{"dropped": n - told})
				told = n
			}
			if (id != "" && d.SpiffeID != id) || (verdict != "" && d.Verdict != events.Verdict(verdict)) {
				continue
			}
			if err := enc.Encode(d); err != nil {
				return nil, nil
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}
