package sds

import (
	"io"
	"net/http"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshid/meshid/identity"
)

// RESTPath is where Envoy's REST mode (api_type REST) POSTs its JSON
// DiscoveryRequest: the google.api.http path of FetchSecrets.
const RESTPath = "/v3/discovery:secrets"

// maxRESTBody bounds a request body; a DiscoveryRequest is a few KiB.
const maxRESTBody = 1 << 20

// HTTPAuthenticator says who sent an HTTP request (client certificate or
// bearer token), the REST twin of Authenticator.
type HTTPAuthenticator func(r *http.Request) (identity.Caller, error)

// HTTPHandler serves Envoy's REST SDS: POST RESTPath with a JSON
// DiscoveryRequest, answered with a JSON DiscoveryResponse. Envoy polls it
// every refresh_delay; the same names and entitlements as the gRPC API.
func (s *Server) HTTPHandler(auth HTTPAuthenticator) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(RESTPath, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			writeHTTPError(w, status.Error(codes.Unimplemented, "use POST with a JSON DiscoveryRequest"))
			return
		}
		caller, err := auth(r)
		if err != nil {
			writeHTTPError(w, status.Error(codes.Unauthenticated, err.Error()))
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, maxRESTBody+1))
		if err != nil || len(body) > maxRESTBody {
			writeHTTPError(w, status.Error(codes.InvalidArgument, "request body unreadable or over 1 MiB"))
			return
		}
		var req discoveryv3.DiscoveryRequest
		if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(body, &req); err != nil {
			writeHTTPError(w, status.Errorf(codes.InvalidArgument, "body is not a JSON DiscoveryRequest: %v", err))
			return
		}
		if err := checkFetch(&req); err != nil {
			writeHTTPError(w, err)
			return
		}
		resp, err := s.fetchFor(r.Context(), caller, &req)
		if err != nil {
			writeHTTPError(w, err)
			return
		}
		out, err := protojson.Marshal(resp)
		if err != nil {
			writeHTTPError(w, status.Error(codes.Internal, "encode response"))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(out)
	})
	return mux
}

var httpCodes = map[codes.Code]int{
	codes.InvalidArgument:  http.StatusBadRequest,
	codes.Unauthenticated:  http.StatusUnauthorized,
	codes.PermissionDenied: http.StatusForbidden,
	codes.NotFound:         http.StatusNotFound,
	codes.Unimplemented:    http.StatusMethodNotAllowed,
	codes.Unavailable:      http.StatusServiceUnavailable,
}

// writeHTTPError answers with the HTTP status matching the gRPC code and a
// google.rpc.Status JSON body, as grpc-gateway does.
func writeHTTPError(w http.ResponseWriter, err error) {
	st := status.Convert(err)
	code, ok := httpCodes[st.Code()]
	if !ok {
		code = http.StatusInternalServerError
	}
	b, _ := protojson.Marshal(st.Proto())
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(b)
}
