// The gRPC server of bench/run's gRPC scenario; built by scripts/test-peers.
// Its dependencies are at the versions ghz v0.121.0 selects, so the two
// builds share Go's module and build caches.
module trellis.dev/peers/grpc-echo

go 1.24

require google.golang.org/grpc v1.56.3

require (
	github.com/golang/protobuf v1.5.4 // indirect
	golang.org/x/net v0.38.0 // indirect
	golang.org/x/sys v0.31.0 // indirect
	golang.org/x/text v0.23.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20230530153820-e85fd2cbaebc // indirect
	google.golang.org/protobuf v1.33.0 // indirect
)
