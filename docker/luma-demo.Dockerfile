# luma-demo: a tiny backend that reports its project, app, release and hostname.
FROM scratch
COPY luma-demo-backend /usr/local/bin/luma-demo-backend
USER 65532:65532
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/luma-demo-backend"]
