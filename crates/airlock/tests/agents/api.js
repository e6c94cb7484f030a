// A stand-in for the Anthropic Messages API and the OpenAI Responses API, for the agent tests:
// an HTTPS server (own test CA) with a scripted "model". Its first answer to an agent is a tool
// call that runs AGENT_SCRIPT (a shell command) in the agent's sandbox; once the request carries
// that tool's result, it answers with a final text. Every request is recorded (headers, body)
// in DIR/requests.jsonl, so the tests can see which key arrived and what the tool printed.
// Usage: node api.js DIR   (DIR holds server.key/server.crt; the port goes to DIR/ready.json)
'use strict';
const fs = require('fs'), https = require('https'), path = require('path');
const dir = process.argv[2];
const script = process.env.AGENT_SCRIPT;
const FINAL = 'All done: the stand-in model is finished.';
const log = (rec) => fs.appendFileSync(path.join(dir, 'requests.jsonl'), JSON.stringify(rec) + '\n');

function sse(res, events) {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  for (const [event, data] of events) res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  res.end();
}

// --- Anthropic Messages API ---
function anthropic(req, body, res) {
  const msgs = body.messages || [];
  const toolNames = (body.tools || []).map((t) => t.name);
  const hasResult = JSON.stringify(msgs).includes('"tool_result"');
  let content, stop;
  if (toolNames.includes('Bash') && !hasResult) {
    content = [{ type: 'tool_use', id: 'toolu_standin_1', name: 'Bash',
                 input: { command: script, description: 'Run the scripted step' } }];
    stop = 'tool_use';
  } else {
    content = [{ type: 'text', text: FINAL }];
    stop = 'end_turn';
  }
  const model = body.model || 'claude-standin';
  const usage = { input_tokens: 10, output_tokens: 10, cache_creation_input_tokens: 0, cache_read_input_tokens: 0 };
  if (!body.stream) {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ id: 'msg_standin', type: 'message', role: 'assistant', model, content,
                             stop_reason: stop, stop_sequence: null, usage }));
    return;
  }
  const ev = [['message_start', { type: 'message_start', message: { id: 'msg_standin', type: 'message',
    role: 'assistant', model, content: [], stop_reason: null, stop_sequence: null, usage } }]];
  content.forEach((c, index) => {
    if (c.type === 'text') {
      ev.push(['content_block_start', { type: 'content_block_start', index, content_block: { type: 'text', text: '' } }]);
      ev.push(['content_block_delta', { type: 'content_block_delta', index, delta: { type: 'text_delta', text: c.text } }]);
    } else {
      ev.push(['content_block_start', { type: 'content_block_start', index,
        content_block: { type: 'tool_use', id: c.id, name: c.name, input: {} } }]);
      ev.push(['content_block_delta', { type: 'content_block_delta', index,
        delta: { type: 'input_json_delta', partial_json: JSON.stringify(c.input) } }]);
    }
    ev.push(['content_block_stop', { type: 'content_block_stop', index }]);
  });
  ev.push(['message_delta', { type: 'message_delta', delta: { stop_reason: stop, stop_sequence: null }, usage: { output_tokens: 10 } }]);
  ev.push(['message_stop', { type: 'message_stop' }]);
  sse(res, ev);
}

// --- OpenAI Responses API ---
function openai(req, body, res) {
  const input = JSON.stringify(body.input || []);
  const hasResult = input.includes('"function_call_output"') || input.includes('"custom_tool_call_output"');
  let item;
  if (!hasResult && input.includes('exec_command')) {
    // Codex's "code mode": one freeform `exec` tool running JavaScript that calls nested tools.
    const js = `const r = await tools.exec_command({ cmd: ${JSON.stringify(script)}, login: false });\ntext(r.output);\n`;
    item = { type: 'custom_tool_call', id: 'ctc_standin_1', call_id: 'call_standin_1', name: 'exec', input: js, status: 'completed' };
  } else {
    item = { type: 'message', id: 'msg_standin_1', role: 'assistant', status: 'completed',
             content: [{ type: 'output_text', text: FINAL, annotations: [] }] };
  }
  const resp = (status, output) => ({ id: 'resp_standin', object: 'response', created_at: Math.floor(Date.now() / 1000),
    status, model: body.model || 'standin', output,
    usage: { input_tokens: 10, input_tokens_details: { cached_tokens: 0 }, output_tokens: 10,
             output_tokens_details: { reasoning_tokens: 0 }, total_tokens: 20 } });
  const ev = [['response.created', { type: 'response.created', sequence_number: 0, response: resp('in_progress', []) }]];
  ev.push(['response.output_item.added', { type: 'response.output_item.added', output_index: 0,
    item: item.type === 'message' ? { ...item, status: 'in_progress', content: [] } : item }]);
  if (item.type === 'message') {
    ev.push(['response.output_text.delta', { type: 'response.output_text.delta', item_id: item.id, output_index: 0, content_index: 0, delta: FINAL }]);
  }
  ev.push(['response.output_item.done', { type: 'response.output_item.done', output_index: 0, item }]);
  ev.push(['response.completed', { type: 'response.completed', response: resp('completed', [item]) }]);
  sse(res, ev);
}

const tls = { key: fs.readFileSync(path.join(dir, 'server.key')), cert: fs.readFileSync(path.join(dir, 'server.crt')) };
const srv = https.createServer(tls, (req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const raw = Buffer.concat(chunks).toString('utf8');
    let body = {};
    try { body = raw ? JSON.parse(raw) : {}; } catch (e) { body = { unparsed: raw.slice(0, 4096) }; }
    log({ method: req.method, path: req.url, headers: req.headers, body });
    const url = req.url.split('?')[0];
    if (req.method === 'POST' && url.endsWith('/v1/messages')) return anthropic(req, body, res);
    if (req.method === 'POST' && url.endsWith('/responses')) return openai(req, body, res);
    if (url.endsWith('/models')) {
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end(JSON.stringify({ object: 'list', data: [], models: [] }));
    }
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ type: 'error', error: { type: 'not_found_error', message: 'stand-in: ' + url } }));
  });
});
srv.listen(0, '127.0.0.1', () => {
  fs.writeFileSync(path.join(dir, 'ready.json.tmp'), JSON.stringify({ port: srv.address().port }));
  fs.renameSync(path.join(dir, 'ready.json.tmp'), path.join(dir, 'ready.json'));
});
