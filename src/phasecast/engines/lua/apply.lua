-- Decide and store one report in one atomic step: the rules of
-- phasecast.model.apply_progress (and, for an ending, apply_terminal) and the ETA of
-- phasecast.progress.estimate_eta, ported line by line (the Python model is the
-- specification; tests/vectors/rules.json holds both to the same answers). No clock is read
-- here: the time comes in ARGV.
--
-- The stored state JSON stays byte for byte what Python's JobState.to_json writes (every
-- reader parses it as it is). Two ways to get there:
-- * a report in the current working phase (with or without steps) edits the stored text
--   in place: each top-level key before "phases" is found by plain search (a JSON string
--   cannot hold an unescaped quote, so the first ',"<key>":' is the field itself); the
--   steps are read with a pattern and must give back exactly the stored text, and only the
--   step reported is encoded again. Nothing is decoded.
-- * anything else decodes the part before "error", applies the rules and re-encodes it
--   field by field, numbers as Python's repr writes floats; "error" (null while the job
--   runs) and "metadata" are kept verbatim. A stored state whose encoding this would not
--   reproduce exactly is left alone (-5): the caller then takes the Python path.
--
-- Per-engine constants are written into the script text by the engine (redis.py) before
-- it is loaded: TTL seconds, TTL refresh interval in ms, history maxlen, PUBLISH/SPUBLISH.
-- The job's TTL (and its history's) is set again when the last setting, kept in the hash
-- field x (Unix ms), is older than the refresh interval (or unknown).
--
-- KEYS: 1 state hash, 2 history stream (both tagged with the job id: one cluster slot)
-- ARGV: 1 now (integer microseconds since the epoch), 2 now as RFC 3339 (ms),
--       3 '|<now as Unix seconds with 3 decimals>|<job id>|' (the pub/sub header's tail),
--       4 channel, 5 ',"owner":<owner>,"kind":<kind>,"phase":"' as JSON the caller expects
--       (the kind its weights are for), 6 weights of QUEUED,ANALYZING,GENERATING,
--       POST_PROCESSING, 7 learned mean seconds of the same four ('' where none), 8 phase,
--       9 phase_progress, 10 step, 11 step_progress, 12 step_status, 13 steps_total,
--       14 message as a JSON string (ARGV 9-14: '' for none); for an ending (ARGV 8
--       COMPLETE, FAILED or CANCELLED): 14 the message as a JSON string, 15 the error as a
--       JSON object or ''. Trailing '' arguments may be left off.
-- Returns {1, state, ix, seq, phase, progress} applied (ix '0': the job's index entries
--         are still to be written); {0, state, ix, seq, phase, progress} late or repeated;
--         {-1} no such job; {-2, phase} ended; {-3, kind, owner} other kind or owner than
--         expected (nothing decided: ask again with theirs); {-4} too many steps; {-5} not
--         reproducible. (seq and progress as the state's JSON writes them.)

local TTL, REFRESH_MS, HISTORY, PUBLISH = __TTL__, __REFRESH_MS__, __HISTORY__, '__PUBLISH__'

local found = redis.call('HMGET', KEYS[1], 'state', 'ix', 'x')
local raw = found[1]
if not raw then
  return {-1}
end
local ix = found[2] or '1'
local now_us, stamp = ARGV[1] + 0, ARGV[2]
local phase = ARGV[8]
local RANK = {QUEUED = 0, ANALYZING = 1, GENERATING = 2, POST_PROCESSING = 3,
              COMPLETE = 4, FAILED = 4, CANCELLED = 4}
local null = cjson.null

local function store(state, seq, terminal, entry)
  local set_at = tonumber(found[3])
  local now_ms = math.floor(now_us / 1000)
  if set_at == nil or now_ms - set_at >= REFRESH_MS or now_ms < set_at then
    redis.call('HSET', KEYS[1], 'state', state, 'seq', seq, 'terminal', terminal, 'x', now_ms)
    redis.call('EXPIRE', KEYS[1], TTL)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', HISTORY, '*', 'e', entry)
    redis.call('EXPIRE', KEYS[2], TTL)
  else
    if terminal == '0' then
      redis.call('HSET', KEYS[1], 'state', state, 'seq', seq)  -- terminal was '0' already
    else
      redis.call('HSET', KEYS[1], 'state', state, 'seq', seq, 'terminal', terminal)
    end
    if not redis.call('XADD', KEYS[2], 'NOMKSTREAM', 'MAXLEN', '~', HISTORY, '*', 'e', entry) then
      -- The history is gone while the job is not (deleted by hand): start it again.
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', HISTORY, '*', 'e', entry)
      redis.call('EXPIRE', KEYS[2], TTL)
    end
  end
  -- The pub/sub payload: redis_feed.encode_change's form (seq|terminal|changed_at|job_id|state).
  redis.call(PUBLISH, ARGV[4], seq .. '|' .. terminal .. ARGV[3] .. state)
end

-- repr(float): the shortest digits that read back as the same double. Lua's tostring
-- writes 14 significant digits, which is the shortest form whenever one of at most 14
-- digits exists (and a float rounded to 0.001 below 10^11 has one); otherwise 15 to 17.
local function float(x)
  if x ~= x or x == math.huge or x == -math.huge then
    error('non-finite number')
  end
  if x == math.floor(x) and math.abs(x) < 1e16 then
    return string.format('%d', x) .. '.0'
  end
  local s = tostring(x)
  if s + 0 == x then
    return s
  end
  for digits = 15, 17 do
    s = string.format('%.' .. digits .. 'g', x)
    if s + 0 == x then
      return s
    end
  end
  return s
end

-- Numbers this script or the engine wrote are read with `text + 0` rather than
-- tonumber(text): Lua 5.1's tonumber parses a string twice (lua_isnumber, then
-- lua_tonumber), and strtod was the largest C cost of a report (callgrind).

local function int(n)
  return string.format('%d', n)
end

-- Python's round(x, n): correctly rounded, ties to even on the exact binary value, which
-- is what C's printf does too.
local ROUNDING = {[1] = '%.1f', [3] = '%.3f'}  -- the formats, not built on every call
local function round(x, decimals)
  return string.format(ROUNDING[decimals], x) + 0
end

-- ARGV 6 and 7: one number (or '') per working phase, comma-separated.
local function numbers(csv, allow_missing)
  local out = {}
  if allow_missing and (csv == '' or csv == ',,,') then
    return out  -- nothing learned yet
  end
  local a, b, c, d = string.match(csv, '^([^,]*),([^,]*),([^,]*),([^,]*)$')
  if a then  -- the four working phases: one match, not an iterator
    local items = {a, b, c, d}
    for k = 1, 4 do
      local item = items[k]
      if item ~= '' then
        out[k] = item + 0
      elseif not allow_missing then
        out[k] = 0.0
      end
    end
    return out
  end
  local i = 0
  for item in string.gmatch(csv .. ',', '([^,]*),') do
    i = i + 1
    if item ~= '' then
      out[i] = item + 0
    elseif not allow_missing then
      out[i] = 0.0
    end
  end
  return out
end

-- --- time ---------------------------------------------------------------------------------

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- '2026-11-29T04:10:00.123Z' -> integer microseconds since the epoch
local B0 = string.byte('0')
local function micros(stamp)
  if #stamp == 24 and string.find(stamp, '^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$') then
    -- format_time's own form: the digits read by their bytes, without strtod.
    local y1, y2, y3, y4, _, m1, m2, _, d1, d2, _, h1, h2, _, i1, i2, _, s1, s2, _, f1, f2, f3 =
      string.byte(stamp, 1, 23)
    local days = days_from_civil(((y1 - B0) * 10 + y2 - B0) * 100 + (y3 - B0) * 10 + y4 - B0,
                                 (m1 - B0) * 10 + m2 - B0, (d1 - B0) * 10 + d2 - B0)
    local seconds = ((days * 24 + (h1 - B0) * 10 + h2 - B0) * 60 + (i1 - B0) * 10 + i2 - B0) * 60
      + (s1 - B0) * 10 + s2 - B0
    return (seconds * 1000 + ((f1 - B0) * 10 + f2 - B0) * 10 + f3 - B0) * 1000
  end
  local y, mo, d, h, mi, s, ms = string.match(stamp,
    '^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)%.(%d%d%d)Z$')
  if not y then
    return nil
  end
  local days = days_from_civil(tonumber(y), tonumber(mo), tonumber(d))
  local seconds = ((days * 24 + tonumber(h)) * 60 + tonumber(mi)) * 60 + tonumber(s)
  return (seconds * 1000 + tonumber(ms)) * 1000
end

-- --- the rules (model.py) -----------------------------------------------------------------

-- model.MAX_WORKING_PROGRESS: only COMPLETE is 100
local MAX_WORKING_PROGRESS = 99.9
local MAX_STEPS = 1000

local function overall_progress(rank, phase_progress, weights)
  local total = 0
  for i = 1, 4 do total = total + weights[i] end
  if total <= 0 then
    return 0.0
  end
  local done = 0
  for i = 1, rank do done = done + weights[i] end
  local current = weights[rank + 1] * phase_progress / 100.0
  return round(math.min(MAX_WORKING_PROGRESS, 100.0 * (done + current) / total), 3)
end

-- progress.estimate_eta for a working phase of rank ``rank`` started at ``started`` (RFC
-- 3339, or nil)
local function estimate_eta(rank, phase_progress, started, weights, means)
  local elapsed = 0.0
  if started ~= nil then
    elapsed = math.max(0.0, (now_us - micros(started)) / 1000000)
  end
  local pace, rate_remaining = nil, nil
  local fraction = phase_progress / 100.0
  if fraction > 0 and elapsed > 0 then
    local phase_total = elapsed / fraction
    rate_remaining = phase_total - elapsed
    local weight = weights[rank + 1]
    if weight > 0 then
      pace = phase_total / weight
    end
  end
  local typical = means[rank + 1]
  local typical_remaining = nil
  if typical ~= nil then
    typical_remaining = math.max(0.0, typical - elapsed)
  end
  local current
  if rate_remaining ~= nil and typical_remaining ~= nil then
    current = fraction * rate_remaining + (1 - fraction) * typical_remaining
  elseif rate_remaining ~= nil then
    current = rate_remaining
  elseif typical_remaining ~= nil then
    current = typical_remaining
  else
    return nil
  end
  local later = 0.0
  for i = rank + 2, 4 do
    if means[i] ~= nil then
      later = later + means[i]
    elseif weights[i] == 0 then
      -- a phase of no weight adds nothing
    elseif pace ~= nil then
      later = later + pace * weights[i]
    else
      return nil
    end
  end
  return round(current + later, 1)
end

-- --- the common report, by editing the stored text ---------------------------------------

local OWNER_KEY, PHASE_PROGRESS_KEY = ',"owner":', '","phase_progress":'
local PROGRESS_KEY, MESSAGE_KEY, ETA_KEY = ',"progress":', ',"message":', ',"eta_seconds":'
local SEQ_KEY, EPOCH_KEY, UPDATED_KEY = ',"seq":', ',"epoch":', ',"updated_at":'
local PHASES_KEY, STEPS_KEY, TOTAL_KEY = '","phases":{', ',"steps":', '},"steps_total":'
local TAIL_KEY = ',"error":null,"metadata":'
-- One stored step as JobState.to_json writes it (step ids: model.STEP_ID_PATTERN).
local STEP_PATTERN = '"([%w][%w%._:%-]*)":{"progress":([^,{}"]+),"status":"(%a+)"}'

local rank = RANK[phase]
local owner_at = string.find(raw, OWNER_KEY, 11, true)
if rank ~= nil and rank < 4 and owner_at ~= nil
    and string.sub(raw, owner_at, owner_at + #ARGV[5] - 1) == ARGV[5] then
  local phase_at = owner_at + #ARGV[5]
  local pp_at = phase_at + #phase + #PHASE_PROGRESS_KEY
  local progress_key = string.sub(raw, phase_at, pp_at - 1) == phase .. PHASE_PROGRESS_KEY
    and string.find(raw, PROGRESS_KEY, pp_at, true)
  local message_key = progress_key and string.find(raw, MESSAGE_KEY, progress_key, true)
  local eta_key = message_key and string.find(raw, ETA_KEY, message_key, true)
  local seq_key = eta_key and string.find(raw, SEQ_KEY, eta_key, true)
  local epoch_key = seq_key and string.find(raw, EPOCH_KEY, seq_key, true)
  local updated_key = epoch_key and string.find(raw, UPDATED_KEY, epoch_key, true)
  local phases_key = updated_key and string.find(raw, PHASES_KEY, updated_key, true)
  local steps_key = phases_key and string.find(raw, STEPS_KEY, phases_key, true)
  -- "steps" ends at the first '}' followed by ',"steps_total":' and a number or null (a
  -- step named steps_total would be followed by '{').
  local steps_at = steps_key and steps_key + #STEPS_KEY
  local total_key = steps_at and string.sub(raw, steps_at, steps_at) == '{'
    and string.find(raw, '},"steps_total":[%dn]', steps_at)
  local tail_at = total_key and string.find(raw, TAIL_KEY, total_key + #TOTAL_KEY, true)
  local old_total_text = tail_at and string.sub(raw, total_key + #TOTAL_KEY, tail_at - 1)
  local steps_raw = old_total_text and string.sub(raw, steps_at, total_key)
  -- The stored steps, in order, each kept as written; read back they must give exactly the
  -- stored text, or the state goes the general way.
  local order, steps, texts = {}, {}, {}
  if steps_raw and (old_total_text == 'null' or string.find(old_total_text, '^%d+$')) then
    for id, progress, status in string.gmatch(steps_raw, STEP_PATTERN) do
      if steps[id] ~= nil or tonumber(progress) == nil then
        steps_raw = nil
        break
      end
      order[#order + 1] = id
      steps[id] = {progress = tonumber(progress), status = status}
      texts[#texts + 1] = '"' .. id .. '":{"progress":' .. progress .. ',"status":"' .. status .. '"}'
    end
    if steps_raw and '{' .. table.concat(texts, ',') .. '}' ~= steps_raw then
      steps_raw = nil
    end
  else
    steps_raw = nil
  end
  if steps_raw then
    local old_pp_text = string.sub(raw, pp_at, progress_key - 1)
    local old_progress_text = string.sub(raw, progress_key + #PROGRESS_KEY, message_key - 1)
    local old_message = string.sub(raw, message_key + #MESSAGE_KEY, eta_key - 1)
    local old_seq_text = string.sub(raw, seq_key + #SEQ_KEY, epoch_key - 1)
    local old_pp = old_pp_text + 0
    local old_total = tonumber(old_total_text)  -- nil for null
    local pp, pp_text, total = old_pp, old_pp_text, old_total
    local function unchanged()
      return {0, raw, ix, old_seq_text, phase, old_progress_text}
    end
    local steps_total = tonumber(ARGV[13] or '')
    if steps_total ~= nil then
      total = math.max(total or 0, steps_total)
    end
    local step_id = (ARGV[10] or '') ~= '' and ARGV[10] or nil
    if step_id ~= nil then
      local step = steps[step_id]
      local index = nil
      if step == nil then
        if #order >= MAX_STEPS then
          return {-4}
        end
        step = {progress = 0.0, status = 'pending'}
        steps[step_id] = step
        order[#order + 1] = step_id
        index = #order
      end
      if step.status ~= 'done' then
        local progress = tonumber(ARGV[11] or '')
        local status = (ARGV[12] or '') ~= '' and ARGV[12] or nil
        if status == 'done' then
          progress = 100.0
        end
        if progress ~= nil then
          step.progress = math.max(step.progress, progress)
        end
        if status ~= nil then
          step.status = status
        elseif (step.status == 'pending' or step.status == 'failed') and progress ~= nil then
          step.status = 'running'
        end
        if step.progress >= 100.0 and step.status ~= 'failed' then
          step.status = 'done'
        end
        if index == nil then
          for k, id in ipairs(order) do
            if id == step_id then index = k break end
          end
        end
      end
      if index ~= nil then
        texts[index] = '"' .. step_id .. '":{"progress":' .. float(step.progress)
          .. ',"status":"' .. step.status .. '"}'
      end
    end
    if #order > 0 then
      local count = math.max(#order, total or 0)
      local sum = 0
      for _, id in ipairs(order) do sum = sum + steps[id].progress end
      local mean = round(sum / count, 3)
      if mean > pp then
        pp, pp_text = mean, float(mean)
      end
    elseif (ARGV[9] or '') ~= '' then
      local reported = ARGV[9] + 0
      if reported < old_pp then
        return unchanged()
      end
      pp, pp_text = reported, ARGV[9]  -- as Python's repr wrote it
    end
    local message = (ARGV[14] or '') ~= '' and ARGV[14] or old_message
    local steps_json = '{' .. table.concat(texts, ',') .. '}'
    if pp == old_pp and message == old_message and steps_json == steps_raw
        and total == old_total then
      return unchanged()
    end
    if pp == old_pp then
      pp_text = old_pp_text
    end
    local weights = numbers(ARGV[6], false)
    local progress_text = float(math.max(old_progress_text + 0,
                                         overall_progress(rank, pp, weights)))
    -- The current phase's start, if it is in "phases" (which ends where "steps" begins).
    local span_key = '"' .. phase .. '":{"started_at":"'
    local span_at = string.find(raw, span_key, phases_key, true)
    local started = nil
    if span_at ~= nil and span_at < steps_key then
      local from = span_at + #span_key
      started = string.sub(raw, from, string.find(raw, '"', from, true) - 1)
    end
    local eta = estimate_eta(rank, pp, started, weights, numbers(ARGV[7] or '', true))
    local seq_text = int(old_seq_text + 1)
    local state = string.sub(raw, 1, pp_at - 1) .. pp_text .. PROGRESS_KEY .. progress_text
      .. MESSAGE_KEY .. message .. ETA_KEY .. (eta == nil and 'null' or float(eta))
      .. SEQ_KEY .. seq_text .. string.sub(raw, epoch_key, updated_key + #UPDATED_KEY - 1)
      .. '"' .. stamp .. string.sub(raw, phases_key, steps_at - 1) .. steps_json
      .. ',"steps_total":' .. (total == nil and 'null' or int(total)) .. string.sub(raw, tail_at)
    store(state, seq_text, '0', '{"seq":' .. seq_text .. ',"at":"' .. stamp .. '","phase":"'
      .. phase .. '","phase_progress":' .. pp_text .. ',"progress":' .. progress_text
      .. ',"message":' .. message .. '}')
    return {1, state, ix, seq_text, phase, progress_text}
  end
end

-- --- anything else: decode, decide, encode ---------------------------------------------------

local PHASES = {'QUEUED', 'ANALYZING', 'GENERATING', 'POST_PROCESSING',
                'COMPLETE', 'FAILED', 'CANCELLED'}
-- model.DEFAULT_MESSAGE for the working phases, as JSON strings
local DEFAULT_MESSAGE = {QUEUED = '"Queued"', ANALYZING = '"Analyzing"',
                         GENERATING = '"Generating"', POST_PROCESSING = '"Post-processing"'}

-- JSON strings exactly as Python's json.dumps(ensure_ascii=False) writes them

local ESCAPES = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
                 ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t'}
local function escape(c)
  return ESCAPES[c] or string.format('\\u%04x', string.byte(c))
end
local function str(s)
  if not string.find(s, '[%z\1-\31"\\]') then
    return '"' .. s .. '"'
  end
  return '"' .. (string.gsub(s, '[%z\1-\31"\\]', escape)) .. '"'
end

local function opt(value, encode)
  if value == nil or value == null then
    return 'null'
  end
  return encode(value)
end

-- --- the stored state ---------------------------------------------------------------------

local function encode_phases(phases)
  local parts = {}
  for _, name in ipairs(PHASES) do
    local span = phases[name]
    if span ~= nil then
      parts[#parts + 1] = str(name) .. ':{"started_at":' .. opt(span.started_at, str)
        .. ',"finished_at":' .. opt(span.finished_at, str) .. '}'
    end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

local function encode_steps(steps, order)
  local parts = {}
  for _, id in ipairs(order) do
    local s = steps[id]
    parts[#parts + 1] = str(id) .. ':{"progress":' .. float(s.progress)
      .. ',"status":' .. str(s.status) .. '}'
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- Everything before "error", with the closing brace left off.
local function encode_head(st, order, message_json)
  return '{"job_id":' .. str(st.job_id) .. ',"owner":' .. str(st.owner)
    .. ',"kind":' .. str(st.kind) .. ',"phase":' .. str(st.phase)
    .. ',"phase_progress":' .. float(st.phase_progress)
    .. ',"progress":' .. float(st.progress)
    .. ',"message":' .. message_json
    .. ',"eta_seconds":' .. opt(st.eta_seconds, float)
    .. ',"seq":' .. int(st.seq) .. ',"epoch":' .. str(st.epoch)
    .. ',"created_at":' .. str(st.created_at) .. ',"updated_at":' .. str(st.updated_at)
    .. ',"phases":' .. encode_phases(st.phases)
    .. ',"steps":' .. encode_steps(st.steps, order)
    .. ',"steps_total":' .. opt(st.steps_total, int)
end

local function steps_mean(steps, order, steps_total)
  local count = math.max(#order, steps_total or 0)
  if count == 0 then
    return 0.0
  end
  local sum = 0
  for _, id in ipairs(order) do sum = sum + steps[id].progress end
  return sum / count
end

local function count_keys(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

-- The stored JSON ends with the parts a report never changes: "error" (null while the job
-- runs) and "metadata". "steps_total" (null or a number) comes right before them; a step
-- named "steps_total" would be followed by "{", so this finds the top-level field.
local cut = string.find(raw, ',"steps_total":[%dnul]+,"error":')
if not cut then
  return {-5}
end
local tail_at = string.find(raw, ',"error":', cut, true)
local head_raw, tail = string.sub(raw, 1, tail_at - 1), string.sub(raw, tail_at)
local st = cjson.decode(head_raw .. '}')

if type(st.kind) ~= 'string' or type(st.owner) ~= 'string' then
  return {-5}
end
if OWNER_KEY .. str(st.owner) .. ',"kind":' .. str(st.kind) .. ',"phase":"' ~= ARGV[5] then
  return {-3, st.kind, st.owner}
end
if RANK[st.phase] == 4 then
  if phase == st.phase then
    return {0, raw, ix, int(st.seq), st.phase, float(st.progress)}  -- the same ending again
  end
  return {-2, st.phase}
end
if st.steps_total == null then st.steps_total = nil end
if st.eta_seconds == null then st.eta_seconds = nil end

-- Step ids in stored order (cjson forgets it; the mean adds them up in this order).
local order = {}
local steps_raw = string.match(head_raw, ',"steps":(%b{}),"steps_total":')
if steps_raw == nil then
  return {-5}
end
for id in string.gmatch(steps_raw, '"([^"]*)":{') do
  order[#order + 1] = id
end
local message_json = str(st.message)
-- Anything but the shape JobState.to_json writes goes to the Python rules.
if type(st.job_id) ~= 'string' or type(st.epoch) ~= 'string'
    or type(st.created_at) ~= 'string' or type(st.updated_at) ~= 'string'
    or type(st.seq) ~= 'number' or type(st.progress) ~= 'number'
    or type(st.phase_progress) ~= 'number' or type(st.phases) ~= 'table'
    or type(st.steps) ~= 'table' or #order ~= count_keys(st.steps)
    or string.sub(tail, 1, 25) ~= ',"error":null,"metadata":' then
  return {-5}
end

local function history_entry(message)
  return '{"seq":' .. int(st.seq) .. ',"at":' .. str(stamp) .. ',"phase":' .. str(st.phase)
    .. ',"phase_progress":' .. float(st.phase_progress) .. ',"progress":' .. float(st.progress)
    .. ',"message":' .. message .. '}'
end

local function reply(state)
  return {1, state, ix, int(st.seq), st.phase, float(st.progress)}
end

if RANK[phase] == 4 then
  -- apply_terminal: the ending closes the phase it interrupts and opens-and-closes its own.
  local current = st.phases[st.phase]
  if current ~= nil and (current.finished_at == nil or current.finished_at == null) then
    current.finished_at = stamp
  end
  st.phases[phase] = {started_at = stamp, finished_at = stamp}
  if phase == 'COMPLETE' then
    st.steps, order, st.steps_total = {}, {}, nil
    st.progress, st.phase_progress, st.eta_seconds = 100.0, 100.0, 0.0
  else
    st.eta_seconds = nil  -- steps, progress and phase progress stay where the job stopped
  end
  st.phase = phase
  st.seq = st.seq + 1
  st.updated_at = stamp
  local error_json = (ARGV[15] or '') ~= '' and ARGV[15] or 'null'
  local state = encode_head(st, order, ARGV[14]) .. ',"error":' .. error_json
    .. string.sub(tail, 14)  -- ,"metadata":… after ',"error":null'
  store(state, int(st.seq), '1', history_entry(ARGV[14]))
  return reply(state)
end

local weights, means = numbers(ARGV[6], false), numbers(ARGV[7] or '', true)
local phase_progress = tonumber(ARGV[9] or '')
local step_id = (ARGV[10] or '') ~= '' and ARGV[10] or nil
local step_progress = tonumber(ARGV[11] or '')
local step_status = (ARGV[12] or '') ~= '' and ARGV[12] or nil
local steps_total = tonumber(ARGV[13] or '')
local new_message = (ARGV[14] or '') ~= '' and ARGV[14] or nil

if RANK[phase] < RANK[st.phase] then
  return {0, raw, ix, int(st.seq), st.phase, float(st.progress)}
end

local old = {phase = st.phase, phase_progress = st.phase_progress, message = message_json,
             steps = steps_raw, steps_total = st.steps_total,
             progress = st.progress, seq = st.seq}
local function unchanged()
  return {0, raw, ix, int(old.seq), old.phase, float(old.progress)}
end

if RANK[phase] > RANK[st.phase] then
  local current = st.phases[st.phase]
  if current ~= nil and (current.finished_at == nil or current.finished_at == null) then
    current.finished_at = stamp
  end
  st.phases[phase] = {started_at = stamp, finished_at = null}
  st.phase = phase
  st.phase_progress = 0.0
  st.steps, order = {}, {}
  st.steps_total = nil
  message_json = DEFAULT_MESSAGE[phase]  -- the previous phase's message does not carry over
end
if steps_total ~= nil then
  st.steps_total = math.max(st.steps_total or 0, steps_total)
end
if step_id ~= nil then
  local s = st.steps[step_id]
  if s == nil then
    if #order >= MAX_STEPS then
      return {-4}
    end
    s = {progress = 0.0, status = 'pending'}
    st.steps[step_id] = s
    order[#order + 1] = step_id
  end
  if s.status ~= 'done' then
    local progress = step_progress
    if step_status == 'done' then
      progress = 100.0
    end
    if progress ~= nil then
      s.progress = math.max(s.progress, progress)
    end
    if step_status ~= nil then
      s.status = step_status
    elseif (s.status == 'pending' or s.status == 'failed') and progress ~= nil then
      s.status = 'running'
    end
    if s.progress >= 100.0 and s.status ~= 'failed' then
      s.status = 'done'
    end
  end
end
if #order > 0 then
  st.phase_progress = math.max(st.phase_progress, round(steps_mean(st.steps, order, st.steps_total), 3))
elseif phase_progress ~= nil then
  if phase_progress < st.phase_progress then
    return unchanged()
  end
  st.phase_progress = phase_progress
end
if new_message ~= nil then
  message_json = new_message
end
st.progress = math.max(old.progress, overall_progress(RANK[st.phase], st.phase_progress, weights))

local steps_json = encode_steps(st.steps, order)
if st.phase == old.phase and st.phase_progress == old.phase_progress
    and message_json == old.message and steps_json == old.steps
    and st.steps_total == old.steps_total then
  return unchanged()
end
st.seq = st.seq + 1
st.updated_at = stamp
local span = st.phases[st.phase]
local started = nil
if span ~= nil and span.started_at ~= nil and span.started_at ~= null then
  started = span.started_at
end
st.eta_seconds = estimate_eta(RANK[st.phase], st.phase_progress, started, weights, means)
local state = encode_head(st, order, message_json) .. tail
store(state, int(st.seq), '0', history_entry(message_json))
return reply(state)
