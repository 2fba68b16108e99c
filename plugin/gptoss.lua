-- gptoss commands; nothing loads until one is first used
if vim.g.loaded_gptoss then return end
vim.g.loaded_gptoss = true

local function cmd(name, method, opts)
  vim.api.nvim_create_user_command(name, function(a) require("gptoss.nvim")[method](a) end, opts)
end
cmd("GptossChat", "chat_command", { nargs = "*" })
cmd("GptossStop", "stop_command", { nargs = 0 })
