package api

// Task credentials for relying parties: the key set, the revocation list, verification.

func (s *Server) credentialKeys(*request) (any, error) { return s.svc.Credentials.Keys(), nil }

func (s *Server) revokedCredentials(*request) (any, error) { return s.svc.Credentials.Revoked(), nil }

func (s *Server) verifyCredential(c *request, req VerifyRequest) (any, error) {
	return s.svc.Credentials.Verify(req.Token)
}
