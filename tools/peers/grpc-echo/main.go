// grpc-echo is the gRPC server behind bench/run's gRPC scenario: grpc-go's
// own interop service (grpc.testing.TestService) with server reflection, so
// ghz needs no .proto file. UnaryCall answers a payload of the requested
// size; StreamingOutputCall answers one message per entry of
// response_parameters. Plaintext HTTP/2 (h2c), as an app behind a sidecar.
//
//	grpc-echo -addr 127.0.0.1:50051
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
)

// Callers choose the answer's size and count; these keep a typo in a
// benchmark from asking for gigabytes.
const (
	maxPayload  = 1 << 20
	maxMessages = 10000
)

type server struct {
	testpb.UnimplementedTestServiceServer
}

func payload(size int32) (*testpb.Payload, error) {
	if size < 0 || size > maxPayload {
		return nil, status.Errorf(codes.InvalidArgument, "payload size %d is outside 0..%d", size, maxPayload)
	}
	return &testpb.Payload{Body: make([]byte, size)}, nil
}

func (server) EmptyCall(context.Context, *testpb.Empty) (*testpb.Empty, error) {
	return &testpb.Empty{}, nil
}

func (server) UnaryCall(_ context.Context, req *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	p, err := payload(req.GetResponseSize())
	if err != nil {
		return nil, err
	}
	return &testpb.SimpleResponse{Payload: p}, nil
}

func (server) StreamingOutputCall(req *testpb.StreamingOutputCallRequest, stream testpb.TestService_StreamingOutputCallServer) error {
	params := req.GetResponseParameters()
	if len(params) > maxMessages {
		return status.Errorf(codes.InvalidArgument, "%d messages asked for, at most %d", len(params), maxMessages)
	}
	for _, rp := range params {
		p, err := payload(rp.GetSize())
		if err != nil {
			return err
		}
		if err := stream.Send(&testpb.StreamingOutputCallResponse{Payload: p}); err != nil {
			return err
		}
	}
	return nil
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "address to listen on (plaintext HTTP/2)")
	flag.Parse()
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("grpc-echo: cannot listen on %s: %v (is the port taken?)", *addr, err)
	}
	s := grpc.NewServer()
	testpb.RegisterTestServiceServer(s, server{})
	reflection.Register(s)
	fmt.Fprintf(os.Stdout, "grpc-echo listening on %s\n", lis.Addr())
	if err := s.Serve(lis); err != nil {
		log.Fatalf("grpc-echo: %v", err)
	}
}
