-- gptoss.slurm: a sweep as a job array on a real single-node Slurm that
-- this spec starts (munged, slurmctld and slurmd from Debian's munge and
-- slurm-wlm, as root, in a temporary directory, torn down after). Pending
-- where those are missing or not root.
local H = require "helpers"
local cjson = require "cjson"

local function sh(cmd)
  local h = io.popen(cmd .. " 2>&1; echo \"exit=$?\"")
  local out = h:read("*a")
  h:close()
  local body, code = out:match("^(.-)exit=(%d+)%s*$")
  return tonumber(code), body
end

local function have(cmd) return sh("command -v " .. cmd) == 0 end

describe("sweep on Slurm", function()
  local root, conf, up, why
  setup(function()
    for _, c in ipairs { "munged", "slurmctld", "slurmd", "sbatch", "squeue" } do
      if not have(c) then why = c .. " not installed (Debian: slurm-wlm, munge)"; return end
    end
    if select(2, sh("id -u")):match("%d+") ~= "0" then why = "starting Slurm needs root"; return end
    root = H.tmpdir() .. "/slurm"
    assert(sh(string.format("mkdir -p %s/state %s/spool %s/munge && chmod 700 %s/munge && " ..
      "dd if=/dev/urandom of=%s/munge/key bs=1024 count=1 2>/dev/null && chmod 400 %s/munge/key",
      root, root, root, root, root, root)) == 0)
    local host = select(2, sh("hostname")):gsub("%s+$", "")
    local port = 20000 + (require("gptoss.core").getpid() % 4000) * 2
    conf = root .. "/slurm.conf"
    H.write(conf, table.concat({
      "ClusterName=gptoss", "SlurmctldHost=" .. host, "SlurmUser=root", "SlurmdUser=root",
      "SlurmctldPort=" .. port, "SlurmdPort=" .. port + 1,
      "AuthType=auth/munge", "CredType=cred/munge", "AuthInfo=socket=" .. root .. "/munge/sock",
      "StateSaveLocation=" .. root .. "/state", "SlurmdSpoolDir=" .. root .. "/spool",
      "SlurmctldPidFile=" .. root .. "/slurmctld.pid", "SlurmdPidFile=" .. root .. "/slurmd.pid",
      "SlurmctldLogFile=" .. root .. "/slurmctld.log", "SlurmdLogFile=" .. root .. "/slurmd.log",
      -- no cgroups: process tracking by /proc, no task plugin, no accounting
      "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
      "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
      "MpiDefault=none", "ReturnToService=2",
      "NodeName=" .. host .. " NodeAddr=127.0.0.1 CPUs=" .. require("gptoss.core").cpu_count() .. " State=UNKNOWN",
      "PartitionName=spec Nodes=" .. host .. " Default=YES MaxTime=INFINITE State=UP",
    }, "\n") .. "\n")
    local env = "SLURM_CONF=" .. conf
    local code, out = sh(string.format("munged -f --key-file=%s/munge/key --socket=%s/munge/sock --pid-file=%s/munge/pid " ..
      "--log-file=%s/munge/log --seed-file=%s/munge/seed && %s slurmctld && %s slurmd", root, root, root, root, root, env, env))
    if code ~= 0 then why = "Slurm did not start: " .. out; return end
    for _ = 1, 100 do                                   -- until the node is idle
      local _, info = sh(env .. " sinfo -h -o %t")
      if info:match("idle") then up = true; break end
      os.execute("sleep 0.2")
    end
    if not up then why = "the Slurm node never came up: " .. H.read(root .. "/slurmctld.log"):sub(-2000) end
  end)

  teardown(function()
    if not root then return end
    for _, f in ipairs { "slurmd.pid", "slurmctld.pid", "munge/pid" } do
      local p = H.exists(root .. "/" .. f) and H.read(root .. "/" .. f):match("%d+")
      if p then
        os.execute("kill " .. p .. " 2>/dev/null")
        for _ = 1, 50 do                                -- slurmctld saves its state before it goes
          if sh("kill -0 " .. p) ~= 0 then break end
          os.execute("sleep 0.1")
        end
      end
    end
  end)

  it("runs a 2-trial sweep as a job array, one trial a task, into one sweep directory", function()
    if why then pending(why); return end
    local dir = root .. "/sweep"
    local spec = root .. "/spec.lua"
    -- each trial records the array task it ran in
    H.write(spec, [[
return {
  name = "array", method = "grid", metric = { name = "score", goal = "minimize" },
  parameters = { x = { values = { 3, 5 } } },
  trial = function(p, report)
    for s = 1, 3 do report(s, { score = p.x * 10 - s }) end
    return { task = tonumber(os.getenv("SLURM_ARRAY_TASK_ID")), job = tonumber(os.getenv("SLURM_ARRAY_JOB_ID")) }
  end,
}]])
    local code, out = sh(string.format("{ SLURM_CONF=%s %s bin/gptoss sweep %s --dir %s --slurm --poll 0.5 2>%s/follow.err; }",
      conf, H.lua, spec, dir, root))
    local err = H.read(root .. "/follow.err")
    assert.are.equal(0, code, out .. err)
    local job = tonumber(err:match("as Slurm job (%d+)"))
    assert.is_number(job, err)
    local seen = {}
    for i = 1, 2 do
      local r = cjson.decode(H.read(string.format("%s/trials/%04d/result.json", dir, i)))
      assert.are.equal("finished", r.state)
      assert.are.equal(job, r.metrics.job)
      assert.are.equal(i, r.metrics.task)                -- trial i ran as array task i
      assert.are.equal(({ 27, 47 })[i], r.metrics.score)
      seen[i] = H.exists(string.format("%s/slurm/%d_%d.out", dir, job, i))
    end
    assert.are.same({ true, true }, seen)
    assert.matches("**Best: trial 1**, score = 27", H.read(dir .. "/report.md"), 1, true)
    assert.matches("**Best: trial 1**", out, 1, true)
    assert.are.equal(3, select(2, H.read(dir .. "/trials.csv"):gsub("\n", "")))
  end)
end)
