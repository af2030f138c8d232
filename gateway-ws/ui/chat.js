// The chat client: direct messages, persistent groups, rooms, topics and
// presence over the public protocol. Everything is built with DOM calls and
// textContent: no HTML from the network is ever parsed.
import { Connection } from './client.js';

const $ = (id) => document.getElementById(id);
const conn = new Connection();
const MAX_KEPT = 500; // messages kept per conversation

let me = null; // the signed-in user id (or the anonymous one)
let appId = null;
let anonymous = false;
let current = null; // key of the open conversation
let nextRef = 0;
let fetchedCount = null; // counting missed messages while a fetch runs
const convs = new Map(); // key -> conversation
const byRef = new Map(); // reference -> sent message
const presence = new Map(); // userId -> online
let acks = [];
let onlineTimer = null;

function conv(kind, name) {
  const key = `${kind}:${name}`;
  let c = convs.get(key);
  if (!c) {
    c = { key, kind, name, title: name, messages: [], ids: new Set(), unread: 0, info: {} };
    convs.set(key, c);
    if (kind === 'dm' && !anonymous) conn.send({ type: 'PRESENCE_SUBSCRIBE', data: { users: [name] } });
    renderList();
  }
  return c;
}

function add(c, m) {
  if (m.id && c.ids.has(m.id)) return null;
  if (m.id) c.ids.add(m.id);
  c.messages.push(m);
  if (c.messages.length > MAX_KEPT) c.messages.shift();
  if (c.key === current) appendMessage(m);
  else if (!m.out && !m.system) {
    c.unread += 1;
    renderList();
  }
  return m;
}

function system(c, text) {
  add(c, { system: true, text, ts: Date.now() });
}

function showError(text) {
  const box = $('errors');
  box.textContent = text;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { box.textContent = ''; }, 8000);
}

function notice(text) {
  $('notice').textContent = text;
}

function setStatus(text) {
  $('status').textContent = text;
}

// ---- rendering ----

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-') || k.startsWith('aria-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function label(c) {
  const kinds = { dm: '', group: '# ', room: '@ ', topic: '~ ' };
  return kinds[c.kind] + c.title;
}

function renderList() {
  const list = $('conversations');
  list.replaceChildren();
  for (const c of convs.values()) {
    const dot = c.kind === 'dm' ? el('span', { class: presence.get(c.name) ? 'dot on' : 'dot', title: presence.get(c.name) ? 'online' : 'offline' }) : null;
    const b = el('button', { type: 'button', 'data-key': c.key, class: c.unread ? 'unread' : '' }, dot, label(c), c.unread ? ` (${c.unread})` : '');
    b.setAttribute('aria-current', c.key === current ? 'true' : 'false');
    b.addEventListener('click', () => openConv(c.key));
    list.append(el('li', {}, b));
  }
}

function renderOnline(users) {
  const list = $('online');
  list.replaceChildren();
  for (const u of users) {
    const b = el('button', { type: 'button', 'data-user': u }, el('span', { class: 'dot on' }), u === me ? `${u} (you)` : u);
    b.addEventListener('click', () => openConv(conv('dm', u).key));
    list.append(el('li', {}, b));
  }
}

function stateText(m) {
  return m.state || '';
}

function messageItem(m) {
  if (m.system) return el('li', { class: 'system' }, el('span', { class: 'meta' }, m.text));
  const time = new Date(m.ts || Date.now()).toLocaleTimeString();
  const who = m.out ? 'you' : (m.nick || m.from || '');
  const state = m.out && m.state ? el('span', { class: `state ${m.state}` }, ` · ${stateText(m)}`) : null;
  const li = el('li', { class: m.out ? 'out' : 'in', 'data-id': m.id || '' }, m.text, el('span', { class: 'meta' }, `${who} · ${time}`, state));
  m.node = li;
  return li;
}

function appendMessage(m) {
  const list = $('messages');
  list.append(messageItem(m));
  list.scrollTop = list.scrollHeight;
}

function setState(m, state) {
  const order = ['sending', 'sent', 'accepted', 'delivered'];
  // Never step back (a late MESSAGE_ACCEPTED after the confirmation).
  if (state !== 'failed' && order.indexOf(state) < order.indexOf(m.state)) return;
  m.state = state;
  const s = m.node && m.node.querySelector('.state');
  if (s) {
    s.className = `state ${state}`;
    s.textContent = ` · ${state}`;
  }
}

function renderDetails(c) {
  const d = $('details');
  d.replaceChildren();
  if (c.kind === 'dm') {
    d.append(presence.get(c.name) ? 'online' : 'offline');
  } else if (c.kind === 'room') {
    d.append(el('span', { id: 'room-members' }, `${c.info.members ?? '?'} members`));
    const leave = el('button', { type: 'button', class: 'link' }, 'leave');
    leave.addEventListener('click', () => { conn.send({ type: 'ROOM_LEAVE', data: { room: c.name } }); c.info.left = true; system(c, 'you left'); });
    d.append(' ', leave);
  } else if (c.kind === 'topic') {
    const rec = c.info.recovered === undefined ? '' : c.info.recovered ? ' · recovered' : ' · some publications were no longer kept';
    d.append(el('span', { id: 'topic-offset' }, `offset ${c.info.offset ?? '?'}${rec}`));
  } else if (c.kind === 'group') {
    d.append(el('span', { id: 'group-info' }, `owner ${c.info.owner ?? '?'} · members: ${(c.info.members || []).join(', ')}`));
    const form = el('form', { class: 'members' });
    const input = el('input', { placeholder: 'demo-dan', 'aria-label': 'Members to add or remove', id: 'member-edit' });
    const addB = el('button', { type: 'submit' }, 'Add');
    const rmB = el('button', { type: 'button' }, 'Remove');
    const members = () => input.value.split(',').map((s) => s.trim()).filter(Boolean);
    form.addEventListener('submit', (ev) => { ev.preventDefault(); conn.send({ type: 'GROUP_ADD_MEMBERS', data: { group: c.name, members: members() } }); input.value = ''; });
    rmB.addEventListener('click', () => { conn.send({ type: 'GROUP_REMOVE_MEMBERS', data: { group: c.name, members: members() } }); input.value = ''; });
    form.append(input, addB, rmB);
    d.append(form);
  }
}

function openConv(key) {
  const c = convs.get(key);
  if (!c) return;
  current = key;
  c.unread = 0;
  $('title').textContent = label(c);
  renderDetails(c);
  $('messages').replaceChildren(...c.messages.map(messageItem));
  $('composer').hidden = false;
  renderList();
  if (c.kind === 'group') conn.send({ type: 'GROUP_INFO', data: { group: c.name } });
  $('text').focus();
}

function refreshDetails(c) {
  if (c.key === current) renderDetails(c);
}

// ---- protocol ----

function ack(id) {
  acks.push(id);
  if (acks.length === 1) queueMicrotask(() => { conn.send({ type: 'ACK', data: { ids: acks } }); acks = []; });
}

const handlers = {
  MESSAGE(f) {
    const d = f.data || {};
    const c = d.group ? conv('group', d.group) : conv('dm', d.from);
    const m = add(c, { id: d.id, from: d.from, text: d.content, ts: d.ts });
    if (fetchedCount !== null && m) fetchedCount += 1;
    if (d.seq !== undefined && d.id) ack(d.id);
  },
  MESSAGE_SENT(f) {
    const d = f.data || {};
    const c = d.group ? conv('group', d.group) : conv('dm', d.to);
    add(c, { id: d.id, out: true, text: d.content, ts: d.ts, state: 'sent' });
  },
  MESSAGE_ACCEPTED(f) {
    const m = byRef.get(f.data?.reference);
    if (m) {
      if (f.data.id && !m.id) { m.id = f.data.id; if (m.node) m.node.dataset.id = m.id; convs.get(m.conv)?.ids.add(m.id); }
      setState(m, 'accepted');
    }
  },
  MESSAGE_CONFIRMATION(f) {
    const m = byRef.get(f.data?.reference);
    if (m) setState(m, 'delivered');
    // Stored for us like a message: acknowledged, or it comes again.
    if (f.data?.seq !== undefined && f.data.id) ack(f.data.id);
  },
  FETCH_MISSING_MESSAGES_COMPLETE(f) {
    const left = f.data?.leftMissingCount || 0;
    const n = fetchedCount || 0;
    notice(n ? `${n} missed message${n === 1 ? '' : 's'} fetched${left ? ` (${left} more on the server)` : ''}` : 'no missed messages');
    fetchedCount = null;
  },
  ERROR(f) {
    const d = f.data || {};
    showError(`${d.code}: ${d.message}`);
    const m = byRef.get(f.reference);
    if (m) setState(m, 'failed');
    // A stored refusal notice (another domain's full inbox) carries a seq.
    if (d.seq !== undefined && d.id) ack(d.id);
  },
  GROUP_CREATED(f) {
    const c = conv('group', f.data.group);
    c.title = f.data.name || f.data.group;
    Object.assign(c.info, f.data);
    openConv(c.key);
  },
  GROUPS_LIST(f) {
    for (const g of f.data?.groups || []) {
      const c = conv('group', g.group);
      c.title = g.name || g.group;
      c.info.owner = g.owner;
    }
    renderList();
  },
  GROUP_INFO(f) {
    const c = conv('group', f.data.group);
    c.title = f.data.name || c.title;
    Object.assign(c.info, f.data);
    refreshDetails(c);
  },
  GROUP_UPDATED(f) {
    conn.send({ type: 'GROUP_INFO', data: { group: f.data.group } });
  },
  GROUP_EVENT(f) {
    const d = f.data || {};
    const c = conv('group', d.group);
    const who = (d.members || []).join(', ');
    system(c, `${d.by} ${d.event.replace('_', ' ')}${who ? `: ${who}` : ''}${d.name ? ` (${d.name})` : ''}`);
    const gone = d.event === 'deleted' || (d.event === 'members_removed' && (d.members || []).includes(me)) || (d.event === 'left' && d.by === me);
    if (!gone) conn.send({ type: 'GROUP_INFO', data: { group: d.group } });
  },
  ROOM_JOINED(f) {
    const d = f.data || {};
    if (d.userId) me = d.userId;
    const c = conv('room', d.room);
    c.info.members = d.members;
    c.info.left = false;
    for (const h of d.history || []) add(c, { id: h.id, from: h.from, nick: h.nick, text: h.content, ts: h.ts, out: h.from === me });
    if (current !== c.key) openConv(c.key); else refreshDetails(c);
  },
  ROOM_MESSAGE(f) {
    const d = f.data || {};
    add(conv('room', d.room), { id: d.id, from: d.from, nick: d.nick, text: d.content, ts: d.ts, out: d.from === me });
  },
  ROOM_EVENT(f) {
    const d = f.data || {};
    const c = conv('room', d.room);
    c.info.members = d.members;
    system(c, `${d.nick || d.userId} ${d.event}`);
    refreshDetails(c);
  },
  ROOM_RESET(f) {
    const c = conv('room', f.data.room);
    system(c, 'the room was reset (its server was lost); it goes on empty');
  },
  SUBSCRIBED(f) {
    const d = f.data || {};
    const c = conv('topic', d.topic);
    c.info.offset = Math.max(c.info.offset || 0, d.offset ?? 0);
    if (d.recovered !== undefined) c.info.recovered = d.recovered;
    if (current !== c.key) openConv(c.key); else refreshDetails(c);
  },
  PUBLICATION(f) {
    const d = f.data || {};
    const c = conv('topic', d.topic);
    c.info.offset = Math.max(c.info.offset || 0, d.offset);
    add(c, { id: d.id, from: d.from, text: d.content, ts: d.ts, out: d.from === me });
    refreshDetails(c);
  },
  PRESENCE(f) {
    // A watched user came or went: the online list is stale.
    conn.send({ type: 'USER_LIST_REQUEST' });
    presence.set(f.data.userId, !!f.data.online);
    renderList();
    const c = convs.get(current);
    if (c && c.kind === 'dm') refreshDetails(c);
  },
  USER_LIST(f) {
    renderOnline(f.data?.users || []);
  },
};

conn.addEventListener('frame', (ev) => {
  const h = handlers[ev.detail.type];
  if (h) h(ev.detail);
});

conn.addEventListener('ready', (ev) => {
  if (!performance.getEntriesByName('sb-signed-in').length) performance.mark('sb-signed-in');
  setStatus(`signed in as ${me || 'anonymous'}`);
  $('signin').hidden = true;
  $('chat').hidden = false;
  $('signout').hidden = false;
  document.body.dataset.signedIn = 'true';
  if (!ev.detail.anonymous) {
    clearInterval(onlineTimer);
    onlineTimer = setInterval(() => conn.send({ type: 'USER_LIST_REQUEST' }), 20000);
    fetchedCount = 0;
    conn.send({ type: 'FETCH_MISSING_MESSAGES_REQUEST', data: { count: 100 } });
    conn.send({ type: 'GROUPS_LIST' });
    conn.send({ type: 'USER_LIST_REQUEST' });
    const users = [...convs.values()].filter((c) => c.kind === 'dm').map((c) => c.name);
    if (users.length) conn.send({ type: 'PRESENCE_SUBSCRIBE', data: { users } });
  }
  // After a reconnection: rooms again, topics from where they were.
  for (const c of convs.values()) {
    if (c.kind === 'room' && !c.info.left) joinRoom(c.name, c.info.nick);
    if (c.kind === 'topic') conn.send({ type: 'SUBSCRIBE', data: { topic: c.name, since: c.info.offset } });
  }
});

conn.addEventListener('refused', (ev) => {
  const d = ev.detail;
  if (d.redirect) showError(`this user lives in another domain: sign in at ${d.redirect.replace(/^ws/, 'http').replace(/\/ws$/, '/')}`);
  else showError(`sign-in refused: ${d.reason || 'not authenticated'}`);
  setStatus('signed out');
});

conn.addEventListener('state', (ev) => {
  const d = ev.detail;
  if (d.state === 'connecting') setStatus('connecting…');
  if (d.state === 'retrying') setStatus(`disconnected${d.reason ? ` (${d.reason})` : ''}; retrying in ${Math.round(d.delay / 100) / 10} s`);
  if (d.state === 'closed') setStatus('signed out');
});

function joinRoom(room, nick) {
  const data = { room };
  if (nick) data.nick = nick;
  if (anonymous) data.appId = appId;
  conn.send({ type: 'ROOM_JOIN', data });
}

// ---- forms ----

function onSubmit(id, fn) {
  $(id).addEventListener('submit', (ev) => {
    ev.preventDefault();
    fn();
  });
}

onSubmit('signin', () => {
  performance.mark('sb-signin');
  appId = $('app').value.trim();
  anonymous = $('anonymous').checked;
  me = anonymous ? null : $('user').value.trim();
  if (!anonymous && !me) { showError('enter a user id'); return; }
  conn.open(anonymous ? { anonymousApp: appId } : { appId, userId: me, token: $('token').value });
  $('token').value = '';
});

$('signout').addEventListener('click', () => {
  clearInterval(onlineTimer);
  conn.close();
  convs.clear();
  byRef.clear();
  presence.clear();
  current = null;
  me = null;
  $('chat').hidden = true;
  $('signin').hidden = false;
  $('signout').hidden = true;
  delete document.body.dataset.signedIn;
  $('conversations').replaceChildren();
  $('messages').replaceChildren();
  notice('');
});

onSubmit('new-direct', () => {
  const to = $('direct-to').value.trim();
  if (to) openConv(conv('dm', to).key);
  $('direct-to').value = '';
});

onSubmit('new-group', () => {
  const members = $('group-members').value.split(',').map((s) => s.trim()).filter(Boolean);
  conn.send({ type: 'GROUP_CREATE', data: { name: $('group-name').value.trim(), members } });
  $('group-name').value = '';
  $('group-members').value = '';
});

onSubmit('join-room', () => {
  const room = $('room-name').value.trim();
  const nick = $('room-nick').value.trim();
  conv('room', room).info.nick = nick;
  joinRoom(room, nick);
  $('room-name').value = '';
});

onSubmit('subscribe-topic', () => {
  conn.send({ type: 'SUBSCRIBE', data: { topic: $('topic-name').value.trim() } });
  $('topic-name').value = '';
});

$('refresh-online').addEventListener('click', () => conn.send({ type: 'USER_LIST_REQUEST' }));

onSubmit('composer', () => {
  const c = convs.get(current);
  const text = $('text').value;
  if (!c || !text) return;
  const feature = $('feature').value;
  const reference = `r${++nextRef}`;
  let frame;
  if (c.kind === 'dm') frame = { type: 'MESSAGE', data: { to: c.name, content: text }, feature, reference };
  else if (c.kind === 'group') frame = { type: 'GROUP_MESSAGE', data: { group: c.name, content: text }, feature, reference };
  else if (c.kind === 'room') frame = { type: 'ROOM_MESSAGE', data: { room: c.name, content: text }, reference };
  else frame = { type: 'PUBLISH', data: { topic: c.name, content: text }, reference };
  const sent = conn.send(frame);
  if (!sent) { showError('not connected: the message was not sent'); return; }
  $('text').value = '';
  // Rooms and topics echo every message to their members: shown on arrival.
  if (c.kind === 'dm' || c.kind === 'group') {
    const m = add(c, { out: true, text, ts: Date.now(), state: 'sent', ref: reference, conv: c.key });
    byRef.set(reference, m);
  }
});
