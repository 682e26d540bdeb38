import json,glob,sys
d=sys.argv[1] if len(sys.argv)>1 else '.'
def load(kind,r):
    fs=glob.glob(f'{d}/{kind}-round-{r}.json')
    return {x['id']:x for x in json.load(open(fs[0]))['results']} if fs else None
def added(res,id,base,q='p99_ms'):
    try: return res[id]['fixed'][q]-res[base]['fixed'][q]
    except Exception: return float('nan')
print(f"{'build':6} {'r':2} {'1hop/ha':>8} {'mesh/ha':>8} {'grpc/ha':>8} {'meshp99+':>9} {'hap99+':>7} {'grpcp99+':>9} {'hagrpc+':>8} {'meshCPUfix':>10} {'haCPUfix':>9} {'meshCPUmax':>10} {'haCPUmax':>9} {'grpcCPUfix':>10}")
for kind in ('pgo','bolt'):
    for r in (1,2,3,4):
        res=load(kind,r)
        if not res: continue
        m=lambda i: res[i]['max']['rps']
        c=lambda i,l: res[i][l]['cpu_s_per_10k']
        print(f"{kind:6} {r:2} {m('trellis-1hop')/m('haproxy-1hop'):8.2f} {m('trellis-mesh')/m('haproxy-mesh'):8.2f} {m('trellis-mesh-grpc-unary')/m('haproxy-mesh-grpc-unary'):8.2f} "
              f"{added(res,'trellis-mesh','direct'):9.3f} {added(res,'haproxy-mesh','direct'):7.3f} {added(res,'trellis-mesh-grpc-unary','direct-grpc-unary'):9.3f} {added(res,'haproxy-mesh-grpc-unary','direct-grpc-unary'):8.3f} "
              f"{c('trellis-mesh','fixed'):10.2f} {c('haproxy-mesh','fixed'):9.2f} {c('trellis-mesh','max'):10.2f} {c('haproxy-mesh','max'):9.2f} {c('trellis-mesh-grpc-unary','fixed'):10.2f}")
