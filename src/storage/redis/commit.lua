-- One batch of eventqueue's Redis store, applied atomically (see storage/redis/mod.rs).
--
-- KEYS[1]  a key of the slot the batch's keys are in (only for routing in a Redis Cluster)
-- ARGV[1]  the mode: "single" (one server: also keeps the tenant index `t:{T}`, `tenants`
--          and the checkpoint id index `ci:{T}`, which live in other slots), "cluster" (a
--          Redis Cluster: every key the script touches is in one slot, so those indexes are
--          left to the node), or "claim" (the checks only: if they pass, the queues checked
--          are this node's for CLAIM_US; the first step of a batch over several slots), or
--          "release" (gives up this node's claims of the queues named)
-- ARGV[2]  the key prefix
-- ARGV[3]  the writing node's id (named in the batch's notice, so the node skips its own)
-- ARGV[4]  n, then n pairs (queue tag, the revision the batch was built on, or "new" for a
--          queue the batch creates)
-- then     m, then m checkpoint checks (tenant, workflow, seq, id): the workflow's next
--          checkpoint number is still `seq` (checked for its first save in the batch) and no
--          checkpoint of the tenant has this id yet
-- then     operations, each a name followed by its arguments:
--   add  tag seq n id1 rec1 ... idn recn
--                                     append n events at consecutive offsets from seq - 1
--                                     as one stream entry, named after its last offset
--                                     (0-(seq+n-1): an entry 0-(o+1) ends with offset o), its
--                                     fields `r` rec1 … `r` recn; each id "" when not indexed
--                                     (an id derived from the offset names it without an
--                                     index entry)
--   trim tag last minid               remove the entries that hold only offsets below `to`
--                                     (and their ids): `last` is the stream id of offset
--                                     to - 1, `minid` that of `to` (an entry holding `to - 1`
--                                     and `to` stays: readers skip offsets below the
--                                     queue's first)
-- (Offsets and revisions pass through Lua numbers (doubles, exact below 2^53) only to add to
-- them, and are printed back with %.0f: Lua's own printing would turn 10^14 and more into
-- exponent form.)
--   put  tag tenant task n f1 v1 ...  store the queue's record (n fields), bump its revision
--   rm   tag tenant task              remove the queue and its events
--   cp   tenant workflow seq id rec   store a checkpoint (keeping the newest `keep`)
--   keep n                            checkpoints kept per workflow
--
-- Returns {"ok", tag, rev, ...} with the new revision of every queue the batch stored (in
-- "cluster" mode also pairs "ci:" .. tenant, checkpoint id: ids of checkpoints the batch
-- dropped beyond `keep`, for the node to remove from the tenant's index), or
-- {"stale", tag, {record fields}, ...} when some queue is no longer at the revision the batch
-- was built on, or another node has its turn, or some checkpoint check failed (nothing of the
-- batch stored in either case).
--
-- A stored batch is announced on the channel PREFIX .. "notices" as one JSON message
-- [node, [["put", tag, tenant, task, rev, f1, v1, ...] or ["rm", tag, tenant, task, rev], ...]]
-- (a removal names the last revision of the queue it removed),
-- so the other nodes take in the new state without polling.
--
-- Revisions: a queue's first revision is the server's clock in microseconds, then +1 per
-- batch. A queue deleted and created again thus starts far above any revision its former
-- self reached, so a node that knew the former queue can never mistake the new one for it.
local mode = ARGV[1]
local p = ARGV[2]
local node = ARGV[3]
local single = mode == 'single'
-- How long a claim holds the queues of a batch over several slots, from its checks until
-- its writes (one round trip later); other nodes' batches of those queues wait meanwhile.
local CLAIM_US = 50000
-- Fairness between nodes writing one queue: a batch found stale because another node wrote
-- the queue first gives its node the queue's next turn (fields `turn`, `till` of the queue's
-- hash) for this long, so its rebuild is not overtaken again by a faster node; the turn ends
-- with that node's next stored batch, or by itself.
local TURN_US = 10000
-- The turns and claims above are brief locks between nodes: written on the master only, never
-- to the AOF or the replicas (`REPL_NONE`), so taking one costs no fsync. A failover or a
-- restart drops them; a batch's writes check its queues' revisions again, so a claim lost
-- that way ends as one that ran out (see storage/redis/mod.rs).
local function unlogged(...)
  redis.set_repl(redis.REPL_NONE)
  local r = redis.call(...)
  redis.set_repl(redis.REPL_ALL)
  return r
end
local function qkey(tag) return p .. 'q:{' .. tag .. '}' end
local function ekey(tag) return p .. 'e:{' .. tag .. '}' end
local function ikey(tag) return p .. 'i:{' .. tag .. '}' end

if mode == 'release' then
  -- A claim given up (another slot of the batch was stale): the queues are free again.
  for k = 0, tonumber(ARGV[4]) - 1 do
    local key = qkey(ARGV[5 + 2 * k])
    if redis.call('HGET', key, 'turn') == node then unlogged('HDEL', key, 'turn', 'till') end
  end
  return {'ok'}
end

local i = 5
local n = tonumber(ARGV[4])
local stale = {}
local news = {}
local kept = {}
local claims = {}
local mine = {}
local now = nil
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return now
end
for _ = 1, n do
  local tag, want = ARGV[i], ARGV[i + 1]
  i = i + 2
  if want == 'new' then
    table.insert(news, tag)
  else
    local f = redis.call('HMGET', qkey(tag), 'rev', 'turn', 'till')
    local others = f[2] and f[2] ~= node and tonumber(f[3]) > clock()
    if f[1] ~= want then
      table.insert(stale, tag)
      -- Behind another node's write: this node's rebuild gets the next turn.
      if f[1] and not others then table.insert(claims, tag) end
    elseif others then
      -- Another node's turn (it was behind, and rebuilds now): wait for it.
      table.insert(stale, tag)
    else
      kept[tag] = f[1]
      if f[2] then table.insert(mine, tag) end
    end
  end
end
-- A queue the batch creates must not exist, unless the batch removes it first (a delete and
-- a create of the same task in one batch: its former self was checked above).
for _, tag in ipairs(news) do
  if not kept[tag] and redis.call('EXISTS', qkey(tag)) == 1 then
    table.insert(stale, tag)
  end
end
local m = tonumber(ARGV[i])
i = i + 1
local checkpoints_stale = false
local firsts = {}
for _ = 1, m do
  local tenant, workflow, seq, id = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  i = i + 4
  local ck = p .. 'c:{' .. tenant .. '/' .. workflow .. '}'
  if not firsts[ck] then
    firsts[ck] = true
    if (redis.call('HGET', ck, 'next') or '0') ~= seq then checkpoints_stale = true end
  end
  if single and redis.call('HEXISTS', p .. 'ci:{' .. tenant .. '}', id) == 1 then
    checkpoints_stale = true
  end
end
if #stale > 0 or checkpoints_stale then
  for _, tag in ipairs(claims) do
    unlogged('HSET', qkey(tag), 'turn', node, 'till', string.format('%.0f', clock() + TURN_US))
  end
  local out = {'stale'}
  for _, tag in ipairs(stale) do
    table.insert(out, tag)
    table.insert(out, redis.call('HGETALL', qkey(tag)))
  end
  return out
end
if mode == 'claim' then
  local till = string.format('%.0f', clock() + CLAIM_US)
  for tag in pairs(kept) do unlogged('HSET', qkey(tag), 'turn', node, 'till', till) end
  return {'ok'}
end

-- The id an event record holds: [type, terminal, id length (2 bytes)], id, JSON.
local function record_id(rec)
  local len = string.byte(rec, 3) * 256 + string.byte(rec, 4)
  return string.sub(rec, 5, 4 + len)
end

for _, tag in ipairs(mine) do unlogged('HDEL', qkey(tag), 'turn', 'till') end

local keep = 100
local revs = {'ok'}
local notes = {}
local argc = #ARGV
while i <= argc do
  local op = ARGV[i]
  if op == 'add' then
    local tag, seq, count = ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    local ek, ik = ekey(tag), ikey(tag)
    i = i + 4
    -- One entry for the run, one XADD: a call from Lua costs more than the entry's fields.
    -- Its stream id is 0-(last offset + 1) (offset 0 cannot be 0-0, an id Redis refuses),
    -- so that `XRANGE 0-(o+1) …` starts at the entry holding offset o.
    local xadd = {'XADD', ek, string.format('0-%.0f', seq + count - 1)}
    for k = 0, count - 1 do
      local id = ARGV[i]
      xadd[4 + 2 * k] = 'r'
      xadd[5 + 2 * k] = ARGV[i + 1]
      if id ~= '' then
        redis.call('HSET', ik, id, string.format('%.0f', seq + k - 1))
      end
      i = i + 2
    end
    redis.call(unpack(xadd))
  elseif op == 'trim' then
    local tag, last, minid = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    -- The ids of the events trimmed leave the index. A queue whose ids are all derived from
    -- their offsets has no index: nothing to read.
    -- An entry may have held trimmed offsets for a while (a trim keeps the entry holding
    -- the queue's first offset), and a producer may have sent such an id again meanwhile:
    -- an id leaves the index only while the index still points at the offset removed.
    if redis.call('EXISTS', ikey(tag)) == 1 then
      local gone = redis.call('XRANGE', ekey(tag), '-', last)
      local ids, offsets = {}, {}
      -- unpack() is bounded by Lua's stack: ids in chunks.
      local function drop()
        if #ids == 0 then return end
        local at = redis.call('HMGET', ikey(tag), unpack(ids))
        local stale = {}
        for j = 1, #ids do
          if at[j] and tonumber(at[j]) == offsets[j] then table.insert(stale, ids[j]) end
        end
        if #stale > 0 then redis.call('HDEL', ikey(tag), unpack(stale)) end
        ids, offsets = {}, {}
      end
      for _, entry in ipairs(gone) do
        -- Entry 0-(o+1) holds the offsets up to o, one record each.
        local fields = entry[2]
        local n = #fields / 2
        local last_offset = tonumber(string.sub(entry[1], 3)) - 1
        for f = 2, #fields, 2 do
          local id = record_id(fields[f])
          if id ~= '' then
            table.insert(ids, id)
            table.insert(offsets, last_offset - n + f / 2)
          end
          if #ids >= 1000 then drop() end
        end
      end
      drop()
    end
    redis.call('XTRIM', ekey(tag), 'MINID', minid)
    i = i + 4
  elseif op == 'put' then
    local tag, tenant, task, nf = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
    local fields = {}
    for k = 1, nf * 2 do fields[k] = ARGV[i + 4 + k] end
    -- The queue's revision: the one checked above (or stored earlier in this batch), or, for
    -- a queue this batch creates, the server's clock; one more for this batch. One HSET
    -- writes it with the record.
    local base = kept[tag]
    if not base then
      base = redis.call('HGET', qkey(tag), 'rev')
      if not base then
        -- New: listed under its tenant (once; a removal unlists it).
        base = clock()
        if single then
          redis.call('ZADD', p .. 't:{' .. tenant .. '}', 0, task)
          redis.call('SADD', p .. 'tenants', tenant)
        end
      end
    end
    local rev = string.format('%.0f', tonumber(base) + 1)
    kept[tag] = rev
    fields[nf * 2 + 1] = 'rev'
    fields[nf * 2 + 2] = rev
    redis.call('HSET', qkey(tag), unpack(fields))
    table.insert(revs, tag)
    table.insert(revs, rev)
    local note = {'put', tag, tenant, task, rev}
    for k = 1, nf * 2 do note[5 + k] = fields[k] end
    table.insert(notes, note)
    i = i + 5 + nf * 2
  elseif op == 'rm' then
    local tag, tenant, task = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local last = redis.call('HGET', qkey(tag), 'rev') or '0'
    redis.call('UNLINK', qkey(tag), ekey(tag), ikey(tag))
    kept[tag] = nil
    if single then redis.call('ZREM', p .. 't:{' .. tenant .. '}', task) end
    table.insert(notes, {'rm', tag, tenant, task, last})
    i = i + 4
  elseif op == 'cp' then
    local tenant, workflow, seq, id, rec =
      ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5]
    local ck = p .. 'c:{' .. tenant .. '/' .. workflow .. '}'
    local ci = p .. 'ci:{' .. tenant .. '}'
    redis.call('HSET', ck, 'r:' .. seq, rec, 'id:' .. seq, id, 'next', seq + 1)
    if single then redis.call('HSET', ci, id, workflow .. '/' .. seq) end
    local old = seq - keep
    if old >= 0 then
      local old_id = redis.call('HGET', ck, 'id:' .. old)
      if old_id and single then
        redis.call('HDEL', ci, old_id)
      elseif old_id then
        table.insert(revs, 'ci:' .. tenant)
        table.insert(revs, old_id)
      end
      redis.call('HDEL', ck, 'r:' .. old, 'id:' .. old)
    end
    i = i + 6
  elseif op == 'keep' then
    keep = tonumber(ARGV[i + 1])
    i = i + 2
  else
    return redis.error_reply('eventqueue: unknown batch operation ' .. tostring(op))
  end
end
if #notes > 0 then
  redis.call('PUBLISH', p .. 'notices', cjson.encode({node, notes}))
end
return revs
