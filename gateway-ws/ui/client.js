// A protocol v1 connection to this server's /ws (docs/protocol.md) that
// reconnects with back-off. Credentials stay in memory; nothing goes in a URL.

const MAX_BACKOFF_MS = 15000;

export class Connection extends EventTarget {
  constructor() {
    super();
    this.ws = null;
    this.credentials = null; // {appId, userId, token} or {anonymousApp}
    this.attempt = 0;
    this.closedByUser = false;
    this.retryTimer = null;
  }

  url() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${scheme}//${location.host}/ws`;
  }

  open(credentials) {
    this.credentials = credentials;
    this.closedByUser = false;
    this.attempt = 0;
    this.connect();
  }

  connect() {
    clearTimeout(this.retryTimer);
    const ws = new WebSocket(this.url());
    this.ws = ws;
    this.emit('state', { state: 'connecting' });
    ws.addEventListener('open', () => {
      const c = this.credentials;
      if (c.anonymousApp) {
        this.attempt = 0;
        this.emit('ready', { anonymous: true });
        return;
      }
      this.send({
        type: 'AUTH_CLIENT',
        data: { appId: c.appId, userId: c.userId, token: c.token, acks: true, device: 'web' },
      });
    });
    ws.addEventListener('message', (ev) => {
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame.type === 'AUTH_CLIENT_REPLY') {
        if (frame.data && frame.data.isAuthenticated) {
          this.attempt = 0;
          this.emit('ready', { anonymous: false });
        } else {
          // A refused sign-in is final: no retry with the same credentials.
          this.closedByUser = true;
          this.emit('refused', frame.data || {});
        }
        return;
      }
      this.emit('frame', frame);
    });
    ws.addEventListener('close', (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.closedByUser) {
        this.emit('state', { state: 'closed', code: ev.code, reason: ev.reason });
        return;
      }
      const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt += 1;
      this.emit('state', { state: 'retrying', delay, code: ev.code, reason: ev.reason });
      this.retryTimer = setTimeout(() => this.connect(), delay);
    });
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  close() {
    this.closedByUser = true;
    clearTimeout(this.retryTimer);
    if (this.ws) this.ws.close(1000, 'signed out');
    this.credentials = null;
  }

  emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }
}
