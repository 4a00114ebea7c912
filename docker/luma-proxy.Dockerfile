# luma-proxy: one per server. A static binary on scratch: no shell, no package manager, no
# docker.sock. Runs unprivileged; SO_BINDTODEVICE on an unbound socket needs no capability.
FROM scratch
COPY luma-proxy /usr/local/bin/luma-proxy
# The state dir exists in the image with the right owner, so a new named volume inherits it.
COPY --chown=65532:65532 state/ /var/lib/luma-proxy/
USER 65532:65532
VOLUME /var/lib/luma-proxy
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/luma-proxy"]
CMD ["serve"]
