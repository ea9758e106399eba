// Live console: open sockets as any role, watch their state, closes and events, publish test events.
import { AdminClient, DinerClient, KitchenClient, WaiterClient, tokenExpiry } from '../client.js';

const $ = (sel, root = document) => root.querySelector(sel);
const httpBase = `${location.protocol}//${location.host}`;
const wsBase = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`;
const MAX_ROWS = 200;
let nextId = 1;
/** @type {Map<number, {client: any, card: HTMLElement}>} */
const sockets = new Map();
window.consoleSockets = sockets;

const ids = (text) => text.split(/[\s,]+/).filter(Boolean).map(Number);
const num = (sel) => { const v = $(sel).value.trim(); return v === '' ? null : Number(v); };

function kindOf(role) {
  return role.startsWith('diner') ? 'diner' : 'staff';
}

function syncForm() {
  $('#add-form').dataset.kind = kindOf($('#role').value);
}
$('#role').addEventListener('change', syncForm);
syncForm();

async function mint(body) {
  const response = await fetch(`${httpBase}/ws/dev/token`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`dev token: ${response.status} ${(await response.json()).detail ?? ''}`);
  const answer = await response.json();
  if (answer.publish_token && !$('#publish-token').value) $('#publish-token').value = answer.publish_token;
  return answer.token;
}

const ROLES = { admin: ['ADMIN'], kitchen: ['KITCHEN'], waiter: ['WAITER'] };
const CLASSES = { admin: AdminClient, kitchen: KitchenClient, waiter: WaiterClient };

function tokenRequest(role) {
  const ttl = num('#ttl') ?? 900;
  if (kindOf(role) === 'diner') {
    return { kind: role === 'diner' ? 'table' : 'legacy', tenant: num('#tenant'), branch: num('#branch'),
      table: num('#table'), session: num('#session'), ttl };
  }
  const sectors = ids($('#sectors').value);
  return { kind: 'staff', user: num('#user'), tenant: num('#tenant'), branches: ids($('#branches').value),
    roles: ROLES[role], sectors: sectors.length ? sectors : null, ttl };
}

function describe(role, req) {
  if (req.kind === 'staff') {
    return `#${nextId} ${role} user ${req.user} tenant ${req.tenant} branches [${req.branches}]`
      + (req.sectors ? ` sectors [${req.sectors}]` : '');
  }
  return `#${nextId} diner (${req.kind}) tenant ${req.tenant} branch ${req.branch} table ${req.table} session ${req.session}`;
}

function render(entry) {
  const { client, card } = entry;
  const s = client.stats;
  const state = $('.state', card);
  state.textContent = s.state;
  state.dataset.state = s.state;
  card.dataset.state = s.state;
  $('.counters', card).textContent = `events ${s.liveEvents} live + ${s.catchupEvents} catch-up, `
    + `${s.duplicatesDropped} duplicates dropped, pongs ${s.pongs}, opens ${s.opens}, attempt ${s.reconnectAttempts}`;
}

function addEventRow(entry, event) {
  const tbody = $('tbody', entry.card);
  const tr = document.createElement('tr');
  tr.className = 'event-row';
  tr.dataset.type = event.type;
  const cells = [new Date().toLocaleTimeString(), event.type, event.tenant_id, event.branch_id, event.sector_id,
    event.session_id, event.entity === undefined ? '' : JSON.stringify(event.entity)];
  cells.forEach((value, i) => {
    const td = document.createElement('td');
    td.textContent = value === undefined || value === null ? '–' : String(value);
    if (i === 6) td.className = 'entity';
    tr.append(td);
  });
  tbody.prepend(tr);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
  // The counters move once the listeners have run.
  queueMicrotask(() => render(entry));
}

function addClose(entry, code, reason) {
  const line = document.createElement('div');
  line.className = 'close-line';
  line.dataset.code = String(code);
  line.textContent = `${new Date().toLocaleTimeString()} closed ${code}${reason ? ` "${reason}"` : ''}`;
  $('.closes', entry.card).prepend(line);
}

async function openSocket(ev) {
  ev.preventDefault();
  $('#connect-error').hidden = true;
  const role = $('#role').value;
  const req = tokenRequest(role);
  const given = $('#token').value.trim();
  const title = describe(role, req);
  try {
    // Fail early (bad form, console off) rather than inside the client's getToken.
    const first = given || await mint(req);
    let pending = first;
    const getToken = given ? () => given : async () => {
      if (pending) { const t = pending; pending = null; return t; }
      return mint(req);
    };
    const options = { url: wsBase, getToken };
    const client = kindOf(role) === 'diner'
      ? new DinerClient(options)
      : new CLASSES[role]({ ...options, branchId: req.branches?.[0] ?? null });
    const card = $('#socket-template').content.firstElementChild.cloneNode(true);
    const id = nextId++;
    card.dataset.id = String(id);
    card.dataset.role = role;
    const exp = tokenExpiry(first);
    $('.title', card).textContent = title + (exp ? `, token exp ${new Date(exp * 1000).toLocaleTimeString()}` : '');
    const entry = { client, card };
    sockets.set(id, entry);
    $('#sockets').prepend(card);
    client.on('*', (event) => addEventRow(entry, event));
    client.onStateChange(() => render(entry));
    client.onClose = (code, reason) => addClose(entry, code, reason);
    $('.ping', card).onclick = () => { client.ping(); setTimeout(() => render(entry), 200); };
    $('.reconnect', card).onclick = () => client.connect();
    $('.disconnect', card).onclick = () => client.disconnect();
    $('.remove', card).onclick = () => { client.destroy(); card.remove(); sockets.delete(id); };
    setInterval(() => render(entry), 1000);
    render(entry);
    await client.connect();
  } catch (error) {
    $('#connect-error').textContent = String(error.message ?? error);
    $('#connect-error').hidden = false;
  }
}

async function publish(ev) {
  ev.preventDefault();
  const result = $('#publish-result');
  let entity = null;
  try {
    const text = $('#publish-entity').value.trim();
    entity = text ? JSON.parse(text) : null;
  } catch {
    result.textContent = 'entity is not valid JSON';
    result.className = 'error';
    return;
  }
  const envelope = { type: $('#publish-type').value.trim(), tenant_id: num('#publish-tenant'),
    branch_id: num('#publish-branch'), table_id: num('#publish-table'), session_id: num('#publish-session'),
    sector_id: num('#publish-sector'), entity, actor: { user_id: 0, role: 'CONSOLE' },
    ts: new Date().toISOString(), v: 1 };
  for (const key of Object.keys(envelope)) if (envelope[key] === null) delete envelope[key];
  const response = await fetch(`${httpBase}/ws/publish`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${$('#publish-token').value}` },
    body: JSON.stringify(envelope),
  });
  const body = await response.json().catch(() => ({}));
  result.className = response.ok ? 'ok' : 'error';
  result.dataset.status = String(response.status);
  result.textContent = response.ok ? `published ${envelope.type}: stream entry ${body.id}` : `${response.status} ${body.detail ?? ''}`;
}

$('#add-form').addEventListener('submit', openSocket);
$('#publish-form').addEventListener('submit', publish);
fetch(`${httpBase}/ws/health`).then((r) => r.json()).then((h) => {
  $('#gateway-info').textContent = `${h.service} ${h.version}, ${h.environment}, ${h.total_connections} sockets`;
}).catch(() => {});
document.body.dataset.ready = 'true';
