import json,glob,sys
d=sys.argv[1] if len(sys.argv)>1 else '.'
print(f"{'slice':6} {'r':2} {'mesh/ha':>8} {'grpc/ha':>8} {'meshp99+':>9} {'hap99+':>7} {'grpcp50+':>9} {'grpcp99+':>9} {'hagrpc99+':>9} {'dgrpcp99':>9} {'grpcCPUfix':>10} {'meshCPUfix':>10} {'haCPUfix':>9}")
for k in ('s0','s100'):
    for r in (1,2,3,4):
        fs=glob.glob(f'{d}/{k}-{r}/*.json') or glob.glob(f'{d}/{k}-round-{r}.json')
        if not fs: continue
        res={x['id']:x for x in json.load(open(fs[0]))['results']}
        m=lambda i: res[i]['max']['rps']; f=lambda i,q='p99_ms': res[i]['fixed'][q]; c=lambda i: res[i]['fixed']['cpu_s_per_10k']
        print(f"{k:6} {r:2} {m('trellis-mesh')/m('haproxy-mesh'):8.2f} {m('trellis-mesh-grpc-unary')/m('haproxy-mesh-grpc-unary'):8.2f} {f('trellis-mesh')-f('direct'):9.3f} {f('haproxy-mesh')-f('direct'):7.3f} "
              f"{f('trellis-mesh-grpc-unary','p50_ms')-f('direct-grpc-unary','p50_ms'):9.3f} {f('trellis-mesh-grpc-unary')-f('direct-grpc-unary'):9.3f} {f('haproxy-mesh-grpc-unary')-f('direct-grpc-unary'):9.3f} {f('direct-grpc-unary'):9.3f} {c('trellis-mesh-grpc-unary'):10.2f} {c('trellis-mesh'):10.2f} {c('haproxy-mesh'):9.2f}")
