// Drives headless Chromium through one scenario of tests/ui.rs:
//   node tests/ui/run.mjs SCENARIO BASE_URL SCREENSHOT_DIR [JSON]
// Exits 0 when every step passed (its last stdout line is a JSON report),
// 1 naming the step that failed (a screenshot of each page is saved either way).
import { chromium } from 'playwright-core';

const [scenario, base, shots, extra] = process.argv.slice(2);
const options = extra ? JSON.parse(extra) : {};
const STEP_MS = 15000;

const browser = await chromium.launch({
  executablePath: process.env.SWITCHBOARD_TEST_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const pages = new Map(); // name -> page
const problems = []; // console errors and CSP reports, per page
let step = 'start';

async function open(name, path = '/') {
  const context = await browser.newContext({ viewport: options.phone ? { width: 390, height: 844 } : { width: 1100, height: 760 } });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('console', (m) => {
    // While the server is away, the browser logs each refused reconnection.
    const expected = scenario === 'reconnect' && /WebSocket connection to .* failed/.test(m.text());
    if (m.type() === 'error' && !expected) problems.push(`${name}: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`${name}: ${e.message}`));
  pages.set(name, page);
  await page.goto(base + path);
  return page;
}

async function signIn(page, user) {
  await page.fill('#app', 'demo');
  await page.fill('#user', user);
  await page.fill('#token', 'any');
  await page.press('#token', 'Enter'); // the keyboard submits
  await page.waitForSelector('body[data-signed-in=true]');
}

async function openConversation(page, key) {
  await page.click(`#conversations button[data-key="${key}"]`);
  await page.waitForSelector(`#conversations button[data-key="${key}"][aria-current=true]`);
}

async function send(page, text, feature = 'RELIABLE') {
  await page.selectOption('#feature', feature);
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

// Hands control to tests/ui.rs (it stops or starts the server) until it
// writes a line back.
const lines = [];
let wake = () => {};
let listening = false;
async function pause(label) {
  if (!listening) {
    listening = true;
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (chunk) => {
      lines.push(...chunk.split('\n').slice(0, -1));
      wake();
    });
  }
  console.log(`PAUSE ${label}`);
  while (!lines.length) await new Promise((resolve) => { wake = resolve; });
  lines.shift();
}

const message = (text) => `#messages li:has-text("${text}")`;

async function expectText(page, selector, pattern) {
  await page.waitForFunction(
    ([sel, re]) => { const e = document.querySelector(sel); return e && new RegExp(re).test(e.textContent); },
    [selector, pattern],
  );
}

async function timings(page) {
  return page.evaluate(() => {
    const nav = performance.getEntriesByType('navigation')[0];
    const resources = performance.getEntriesByType('resource');
    const mark = (n) => performance.getEntriesByName(n)[0]?.startTime;
    return {
      loadMs: Math.round(nav.loadEventEnd),
      signInMs: Math.round(mark('sb-signed-in') - mark('sb-signin')),
      firstLoadBytes: nav.transferSize + resources.reduce((s, r) => s + r.transferSize, 0),
      files: 1 + resources.length,
    };
  });
}

const scenarios = {
  // Two users exchange a RELIABLE message; a third tab of the sender shows it.
  async direct() {
    step = 'ann signs in';
    const ann = await open('ann');
    await signIn(ann, 'demo-ann');
    const measured = await timings(ann);
    step = 'bob and a second tab of ann sign in';
    const bob = await open('bob');
    await signIn(bob, 'demo-bob');
    const ann2 = await open('ann-second-tab');
    await signIn(ann2, 'demo-ann');
    step = 'ann sends bob a RELIABLE message';
    await ann.fill('#direct-to', 'demo-bob');
    await ann.press('#direct-to', 'Enter');
    await send(ann, 'hello bob');
    step = 'bob sees it';
    await openConversation(bob, 'dm:demo-ann');
    await bob.waitForSelector(message('hello bob'));
    step = 'ann sees it delivered';
    await ann.waitForSelector(`${message('hello bob')} .state.delivered`);
    step = "ann's second tab shows the sent copy";
    await openConversation(ann2, 'dm:demo-bob');
    await ann2.waitForSelector(`#messages li.out:has-text("hello bob")`);
    step = 'a message to a user of no app fails with the server\'s words';
    await ann.fill('#direct-to', 'nobody-1');
    await ann.press('#direct-to', 'Enter');
    await send(ann, 'lost');
    await expectText(ann, '#errors', '^INVALID_RECIPIENT: ');
    await ann.waitForSelector(`${message('lost')} .state.failed`);
    step = 'bob answers FAST; ann sees it';
    await send(bob, 'hi ann', 'FAST');
    await openConversation(ann, 'dm:demo-bob');
    await ann.waitForSelector(message('hi ann'));
    step = "ann sees bob online, then offline when he signs out";
    await ann.waitForSelector('#conversations button[data-key="dm:demo-bob"] .dot.on');
    await ann.waitForSelector('#online button[data-user="demo-bob"]');
    await bob.click('#signout');
    await ann.waitForSelector('#conversations button[data-key="dm:demo-bob"] .dot:not(.on)');
    return measured;
  },

  // A message to a user who is not signed in is fetched at sign-in.
  async missed() {
    step = 'ann signs in and writes to dan, who is offline';
    const ann = await open('ann');
    await signIn(ann, 'demo-ann');
    await ann.fill('#direct-to', 'demo-dan');
    await ann.press('#direct-to', 'Enter');
    await send(ann, 'while you were out');
    await ann.waitForSelector(`${message('while you were out')} .state.accepted`);
    step = 'dan signs in later and sees it';
    const dan = await open('dan');
    await signIn(dan, 'demo-dan');
    await expectText(dan, '#notice', '^1 missed message fetched');
    await openConversation(dan, 'dm:demo-ann');
    await dan.waitForSelector(message('while you were out'));
    step = 'ann sees it delivered';
    await ann.waitForSelector(`${message('while you were out')} .state.delivered`);
    return {};
  },

  // A persistent group, a room and a topic, each one round trip.
  async channels() {
    step = 'ann and bob sign in';
    const ann = await open('ann');
    await signIn(ann, 'demo-ann');
    const bob = await open('bob', '/');
    await signIn(bob, 'demo-bob');
    step = 'ann creates a group with bob and writes to it';
    await ann.fill('#group-name', 'Team');
    await ann.fill('#group-members', 'demo-bob');
    await ann.press('#group-members', 'Enter');
    await expectText(ann, '#group-info', 'members: .*demo-bob');
    await send(ann, 'hello team');
    step = 'bob sees the group message';
    await bob.waitForSelector('#conversations button[data-key^="group:"]');
    await bob.click('#conversations button[data-key^="group:"]');
    await bob.waitForSelector(message('hello team'));
    await expectText(bob, '#title', 'Team');
    step = 'ann adds cid to the group, then removes cid';
    await ann.fill('#member-edit', 'demo-cid');
    await ann.press('#member-edit', 'Enter');
    await expectText(ann, '#group-info', 'members: .*demo-cid');
    await ann.fill('#member-edit', 'demo-cid');
    await ann.click('#details button:has-text("Remove")');
    await expectText(ann, '#group-info', '^(?!.*demo-cid)owner demo-ann');
    await bob.waitForSelector('#messages li.system:has-text("members removed: demo-cid")');
    step = 'both join a room; bob writes; ann sees it and two members';
    for (const [page, nick] of [[ann, 'ann'], [bob, 'bob']]) {
      await page.fill('#room-name', 'kitchen');
      await page.fill('#room-nick', nick);
      await page.press('#room-nick', 'Enter');
      await page.waitForSelector('#conversations button[data-key="room:kitchen"][aria-current=true]');
    }
    await send(bob, 'coffee?');
    await ann.waitForSelector(message('coffee?'));
    await expectText(ann, '#room-members', '^2 members');
    step = 'a guest joins the room anonymously and gets its history';
    const guest = await open('guest');
    await guest.check('#anonymous');
    await guest.press('#app', 'Enter');
    await guest.waitForSelector('body[data-signed-in=true]');
    await guest.fill('#room-name', 'kitchen');
    await guest.fill('#room-nick', 'guest');
    await guest.press('#room-nick', 'Enter');
    await guest.waitForSelector(message('coffee?'));
    await expectText(guest, '#room-members', '^3 members');
    step = 'both subscribe to a topic; ann publishes; bob sees it';
    for (const page of [ann, bob]) {
      await page.fill('#topic-name', 'prices');
      await page.press('#topic-name', 'Enter');
      await page.waitForSelector('#conversations button[data-key="topic:prices"][aria-current=true]');
    }
    await send(ann, 'eur 1.08');
    await bob.waitForSelector(message('eur 1.08'));
    await expectText(bob, '#topic-offset', 'offset [1-9]');
    return {};
  },

  // The server goes away and comes back: the pages reconnect by themselves.
  async reconnect() {
    step = 'ann and bob sign in';
    const ann = await open('ann');
    await signIn(ann, 'demo-ann');
    const bob = await open('bob');
    await signIn(bob, 'demo-bob');
    step = 'the server stops: the pages say they retry';
    await pause('stop');
    await expectText(ann, '#status', 'retrying in');
    await expectText(bob, '#status', 'retrying in');
    step = 'the server is back: both pages sign in again by themselves';
    await pause('start');
    await expectText(ann, '#status', '^signed in as demo-ann$');
    await expectText(bob, '#status', '^signed in as demo-bob$');
    step = 'ann writes to bob after the restart; delivered';
    await ann.fill('#direct-to', 'demo-bob');
    await ann.press('#direct-to', 'Enter');
    await send(ann, 'after the restart');
    await openConversation(bob, 'dm:demo-ann');
    await bob.waitForSelector(message('after the restart'));
    await ann.waitForSelector(`${message('after the restart')} .state.delivered`);
    return {};
  },

  // The console lists the processes of the cluster.
  async console() {
    step = 'the console asks for the key';
    const page = await open('console', '/console');
    await page.fill('#key', options.key);
    await page.press('#key', 'Enter');
    step = 'the console lists every process';
    for (const id of options.members) {
      await page.waitForSelector(`#members tr[data-id="${id}"]`);
    }
    await page.waitForSelector('#stats b');
    step = 'a message id links to its trace in Jaeger';
    await page.fill('#trace-id', 'msg-42');
    await page.press('#trace-id', 'Enter');
    const href = await page.getAttribute('#trace-link', 'href');
    if (!href.startsWith(`${options.jaeger}/search?`) || !decodeURIComponent(href).includes('{"message.id":"msg-42"}')) throw new Error(`trace link ${href}`);
    step = 'the key is nowhere but in memory';
    const stored = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }) + location.href + document.cookie);
    if (stored.includes(options.key)) throw new Error(`the key was stored: ${stored}`);
    return {};
  },
};

let report;
let failed = null;
try {
  if (!scenarios[scenario]) throw new Error(`no scenario ${scenario}`);
  report = await scenarios[scenario]();
  step = 'no script errors and no CSP violations';
  if (problems.length) throw new Error(problems.join('\n'));
} catch (e) {
  failed = e;
}
for (const [name, page] of pages) {
  await page.screenshot({ path: `${shots}/${scenario}-${name}.png`, fullPage: true }).catch(() => {});
}
await browser.close();
if (failed) {
  console.error(`step "${step}" failed: ${failed.message}`);
  if (problems.length) console.error(`page errors:\n${problems.join('\n')}`);
  process.exit(1);
}
console.log(JSON.stringify(report));
process.exit(0); // stdin may still be open
