import json,glob,sys
d=sys.argv[1] if len(sys.argv)>1 else '.'
print(f"{'build':8} {'r':2} {'mesh/ha':>8} {'1hop/ha':>8} {'grpc/ha':>8} {'meshp99+':>9} {'hap99+':>7} {'grpcp99+':>9} {'hagrpc99+':>9} {'meshCPUfix':>10} {'haCPUfix':>9} {'meshCPUmax':>10} {'haCPUmax':>9} {'idleMB':>7}")
for k in ('release','dist'):
    for r in (1,2,3):
        fs=glob.glob(f'{d}/{k}-{r}/*.json') or glob.glob(f'{d}/{k}-round-{r}.json')
        if not fs: continue
        j=json.load(open(fs[0])); res={x['id']:x for x in j['results']}
        m=lambda i: res[i]['max']['rps']; f=lambda i,q='p99_ms': res[i]['fixed'][q]; c=lambda i,l='fixed': res[i][l]['cpu_s_per_10k']
        idle=max(j['env']['idle_rss_kb'].values())/1024 if 'env' in j else float('nan')
        print(f"{k:8} {r:2} {m('trellis-mesh')/m('haproxy-mesh'):8.2f} {m('trellis-1hop')/m('haproxy-1hop'):8.2f} {m('trellis-mesh-grpc-unary')/m('haproxy-mesh-grpc-unary'):8.2f} "
              f"{f('trellis-mesh')-f('direct'):9.3f} {f('haproxy-mesh')-f('direct'):7.3f} {f('trellis-mesh-grpc-unary')-f('direct-grpc-unary'):9.3f} {f('haproxy-mesh-grpc-unary')-f('direct-grpc-unary'):9.3f} "
              f"{c('trellis-mesh'):10.2f} {c('haproxy-mesh'):9.2f} {c('trellis-mesh','max'):10.2f} {c('haproxy-mesh','max'):9.2f} {idle:7.1f}")
